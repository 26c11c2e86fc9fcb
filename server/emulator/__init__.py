"""An Auth0 tenant emulator: a real Starlette app speaking Auth0's Authentication API.

It stands in for Auth0 in the demo mode, the tests and `token-vault-mcp emulator`, and
imports nothing from the rest of the product.

Auth0's API (`create_app(state)`; tenant data and knobs live in `EmulatorState`):

- `GET  /.well-known/openid-configuration`, `GET /.well-known/jwks.json`
- `POST /oauth/token` (form or JSON body; client_secret_post, client_secret_basic or
  private_key_jwt; native clients by client_id alone) with the grants
  `client_credentials`, `refresh_token`, `urn:ietf:params:oauth:grant-type:device_code`
  and Token Vault's
  `urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token`
- `POST /oauth/device/code` (native clients only)

Errors are `{"error", "error_description"}` with Auth0's statuses. `state.requests` records
every request to the two POST endpoints; `state.faults` injects latency, 5xx and 429.

Test API (served unless `create_app(state, admin=False)`), JSON bodies:

- `POST /emulator/tokens` `{"sub", "scopes", "azp"?, "audience"?, "expires_in"?}` →
  `{"access_token", "token_type", "expires_in"}`: an access token for any account, agent
  and scopes (audience defaults to the tenant's first API).
- `POST /emulator/accounts` `{"sub", "connection", "scopes"}`: give a user (created if
  new) a connected account at a provider.
- `POST /emulator/device/approve` `{"user_code", "sub"}` and
  `POST /emulator/device/deny` `{"user_code"}`: the user's side of the device flow
  (404 `not_found` when no such code is pending).
"""

from server.emulator.app import create_app
from server.emulator.demo import DemoTenant, demo_tenant
from server.emulator.faults import Faults
from server.emulator.serve import serve
from server.emulator.state import EmulatorState, RecordedRequest

__all__ = ["DemoTenant", "EmulatorState", "Faults", "RecordedRequest", "create_app", "demo_tenant", "serve"]
