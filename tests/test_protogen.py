"""Generated protobuf/gRPC modules must match proto/ (regenerate: python -m ps.protogen)."""

from ps.protogen import stale_files


def test_generated_modules_match_the_proto_files():
    assert stale_files() == [], "run `python -m ps.protogen` and commit the result"
