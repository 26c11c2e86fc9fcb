"""An Auth0 tenant emulator: a real Starlette app speaking Auth0's Authentication API.

It stands in for Auth0 in the demo mode, the tests and `token-vault-mcp emulator`, and
imports nothing from the rest of the product.

Auth0's API (`create_app(state)`; tenant data and knobs live in `EmulatorState`):

- `GET  /.well-known/openid-configuration`, `GET /.well-known/jwks.json`
- `POST /oauth/token` (form or JSON body; client_secret_post, client_secret_basic or
  private_key_jwt; native clients by client_id alone) with the grants
  `client_credentials`, `refresh_token`, `urn:ietf:params:oauth:grant-type:device_code`,
  CIBA's `urn:openid:params:grant-type:ciba` (`auth_req_id`) and Token Vault's
  `urn:auth0:params:oauth:grant-type:token-exchange:federated-connection-access-token`
- `GET  /authorize` (authorization.py: code + PKCE S256, a sign-in page POSTing to
  `/authorize/login`, or `state.auto_login_sub` / `--auto-login` to sign in at once) and the
  `authorization_code` grant (code_grant.py: single use, `state.code_expires_in`, PKCE,
  same client and redirect_uri; `id_token` for openid; API tokens carry the user's permissions)
- My Account API (my_account.py): `POST /me/v1/connected-accounts/connect` and `/complete`,
  `GET …/accounts`, `DELETE …/accounts/{id}`, errors `{type, status, title, detail,
  validation_errors?}`; its `connect_uri` (`GET|POST /connect`) is the provider consent page
- `POST /oauth/device/code` (native clients only)
- `POST /oauth/revoke` (a refresh token, by the client it was issued to)
- `POST /bc-authorize` (CIBA, ciba.py; client authentication as for `/oauth/token`): `scope`
  with openid, `login_hint` `{"format":"iss_sub","iss":ISSUER,"sub":…}` naming a known user,
  `binding_message` (≤ 64 of letters, digits, spaces, `+-_.,:#`), optional `requested_expiry`
  (default 300, 1..259200), `authorization_details` (JSON array, ≤ 5 objects with a `type`)
  and `audience` → `{auth_req_id, expires_in, interval}`; polls answer 400
  `authorization_pending`, `slow_down` (new `interval` in the body), `access_denied` (denied
  or expired), `invalid_grant` (used), or the tokens with `id_token` and
  `authorization_details` echoed

Not Auth0's, a provider stand-in (provider.py): `/provider/{connection}/…`, any method, accepts
only a live token this Token Vault issued for that connection and answers 200 JSON with what it
saw (`connection`, `account`, `scopes`, `method`, `path`, `query`, `body`), else 401.

Errors are `{"error", "error_description"}` with Auth0's statuses. `state.requests` records
every request to the POST endpoints; `state.faults` (faults.py) injects latency, 5xx, 429
with either rate-limit header, connection resets, hangs and malformed JSON, queued for the
next requests or at a rate. `state.revoke_connection` makes a connected account stale,
`state.auto_approve_sub` approves device logins at once, and `state.ciba_mode` (`approve`, the
default, optionally after `state.ciba_approve_after` seconds; `deny`; `manual`) decides how the
user answers CIBA requests, polled every `state.ciba_interval` seconds (default 5).

Test API (served unless `create_app(state, admin=False)`), JSON bodies:

- `POST /emulator/tokens` `{"sub", "scopes", "azp"?, "audience"?, "expires_in"?}` →
  `{"access_token", "token_type", "expires_in"}`: an access token for any account, agent
  and scopes (audience defaults to the tenant's first API).
- `POST /emulator/accounts` `{"sub", "connection", "scopes"}`: give a user (created if
  new) a connected account at a provider.
- `POST /emulator/accounts/revoke` `{"sub", "connection"}`: the provider revoked that
  connected account (404 `not_found` when there is none).
- `POST /emulator/accounts/require-connect` `{"sub", "connection"}`: the user has no account
  there (Token Vault answers 401 until they connect it); `POST /emulator/accounts/expire`
  (same body): the connected account expires now.
- `POST /emulator/users` `{"sub", "name"?, "permissions"?: {AUDIENCE: [...]}}`: create or update
  a user (the sign-in page lists users by name; API tokens carry these permissions).
- `POST /emulator/login` `{"sub": SUB | null}`: who `/authorize` signs in at once (null: the page).
- `POST /emulator/clients/{client_id}/callbacks` `{"urls": [...]}`: more Allowed Callback URLs.
- `POST /emulator/device/approve` `{"user_code", "sub"}` and
  `POST /emulator/device/deny` `{"user_code"}`: the user's side of the device flow
  (404 `not_found` when no such code is pending).
- `GET /emulator/approvals` → `{"approvals": [{"auth_req_id", "sub", "binding_message",
  "authorization_details"}]}`: the CIBA requests still pending, oldest first.
- `POST /emulator/approvals/{auth_req_id}` `{"decision": "approve"|"deny"}`: the user's answer
  (404 `not_found` when that request is not pending).
- `POST /emulator/faults` `{"clear"?, "latency"?, "fail_rate"?, "fail_status"?,
  "rate_limit_rate"?, "retry_after"?, "reset_in"?, "reset_rate"?, "hang_rate"?,
  "malformed_rate"?, "seed"?, "next"?: [{"kind", "count"?, "status"?, "error"?,
  "retry_after"?, "reset_in"?}]}` → the current settings and `pending` (queued faults).
  `kind` is `status`, `rate_limit`, `reset`, `hang` or `malformed`.
"""

from server.emulator.app import create_app
from server.emulator.demo import DemoTenant, demo_tenant
from server.emulator.faults import Faults, FaultSettings
from server.emulator.serve import serve
from server.emulator.state import EmulatorState, RecordedRequest

__all__ = [
    "DemoTenant",
    "EmulatorState",
    "FaultSettings",
    "Faults",
    "RecordedRequest",
    "create_app",
    "demo_tenant",
    "serve",
]
