"""`dpfl secagg-keys`: members' identity keys and the pinned list a node loads."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, RecordDict

from dpfl_app.secagg.identity import IdentityError, load_pinned_keys
from dpfl_app.client.secagg import identity
from dpfl_app.tools import secagg_keys


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_members_keys_pin_into_one_list_each_node_loads(tmp_path):
    entries = [secagg_keys.new_member(name, tmp_path / name)[1] for name in ("site-a", "site-b")]
    assert oct((tmp_path / "site-a" / "site-a.pem").stat().st_mode & 0o777) == "0o600"
    pinned = tmp_path / "pinned-keys.json"
    assert secagg_keys.main(["pin", *map(str, entries), "--out", str(pinned)]) == 0
    assert sorted(load_pinned_keys(pinned)) == ["site-a", "site-b"]
    node = identity(_context({"secagg-identity-key": str(tmp_path / "site-b" / "site-b.pem"),
                              "secagg-pinned-keys": str(pinned)}))
    assert node.name == "site-b" and node.pinned is not None
    with pytest.raises(IdentityError, match="not a member"):
        node.verification_key("site-z", b"")


def test_a_key_missing_from_the_list_or_half_a_configuration_is_refused(tmp_path):
    secagg_keys.new_member("site-a", tmp_path)
    secagg_keys.new_member("site-c", tmp_path)
    pinned = tmp_path / "pinned.json"
    pinned.write_text((tmp_path / "site-a.pub.json").read_text())
    with pytest.raises(IdentityError, match="not .*in the pinned key list"):
        identity(_context({"secagg-identity-key": str(tmp_path / "site-c.pem"),
                           "secagg-pinned-keys": str(pinned)}))
    with pytest.raises(IdentityError, match="go together"):
        identity(_context({"secagg-pinned-keys": str(pinned)}))
    with pytest.raises(IdentityError, match="exists"):
        secagg_keys.new_member("site-a", tmp_path)
    pinned.write_text(json.dumps({"x": "AAAA"}))
    with pytest.raises(IdentityError, match="32-byte"):
        load_pinned_keys(pinned)


def test_without_node_config_a_node_keeps_one_relayed_identity_for_the_run():
    context = _context({})
    first, second = identity(context), identity(context)
    assert first.pinned is None and first.public == second.public
