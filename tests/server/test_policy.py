"""The policy file: per-agent rules, `*` for the rest, refused whole with one line naming entry and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.policy import DEFAULT_RULE, Policy, PolicyFileError, parse_policy, read_policy_file

GOOD = """
[[agent]]
id = "*"
calls_per_minute = 120

[[agent]]
id = "ci-bot"
connections = ["github"]
max_spend_per_day = 5000
max_grants_per_hour = 60
approval = "always"
"""


def test_a_policy_names_agents_and_a_default_for_the_rest(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(GOOD, encoding="utf-8")
    policy = read_policy_file(tmp_path / "p.toml")
    bot = policy.rule_for("ci-bot")
    assert (bot.connections, bot.max_spend_per_day, bot.max_grants_per_hour, bot.approval) == (
        ("github",), 5000, 60, "always"
    )
    assert bot.calls_per_minute == 600  # a named agent's own defaults, not the `*` rule's
    assert policy.rule_for("someone-else").calls_per_minute == 120
    assert policy.rule_for(None).id == "*"
    assert bot.may_use("github") and not bot.may_use("stripe")
    assert Policy.from_json(policy.to_json()) == policy
    assert Policy().rule_for("x") == DEFAULT_RULE and DEFAULT_RULE.may_use("anything")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[agent]]\nid = "a"\ncolour = "red"', 'agent "a": colour: unknown key'),
        ('[[agent]]\nid = "a"\ncalls_per_minute = "60"',
         'agent "a": calls_per_minute: Input should be a valid integer'),
        ('[[agent]]\nid = "a"\ncalls_per_minute = 0', 'agent "a": calls_per_minute: Input should be greater'),
        ('[[agent]]\nid = "a"\nconnections = "github"', 'agent "a": connections: '),
        ('[[agent]]\nid = "a"\napproval = "sometimes"', 'agent "a": approval: '),
        ('[[agent]]\nid = "a"\nmax_spend_per_day = true', 'agent "a": max_spend_per_day: '),
        ('[[agent]]\ncalls_per_minute = 5', "agent #1: id: Field required"),
        ('[[agent]]\nid = "a"\n[[agent]]\nid = "a"', 'agent "a" appears twice'),
        ('[[agents]]\nid = "a"', 'unknown table or key "agents"'),
        ('[[agent]]\nid = "a b"', 'agent "a b": id: '),
    ],
)
def test_a_bad_policy_is_refused_naming_the_entry_and_the_key(text: str, message: str) -> None:
    import tomllib

    with pytest.raises(PolicyFileError) as caught:
        parse_policy(tomllib.loads(text), "p.toml")
    assert str(caught.value).startswith("p.toml: ") and message in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_unreadable_or_malformed_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read policy file"):
        read_policy_file(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[[agent]\n", encoding="utf-8")
    with pytest.raises(PolicyFileError, match="not valid TOML"):
        read_policy_file(tmp_path / "bad.toml")
