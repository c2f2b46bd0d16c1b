"""How people see peer ids."""

_PREFIX = "12D3KooW"  # every Ed25519 peer id starts with this


def short_id(peer_id: str) -> str:
    """Eight characters people can read aloud: the tail of the id, past the fixed prefix."""
    return peer_id.removeprefix(_PREFIX)[-8:]
