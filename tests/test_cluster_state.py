"""The scheduler's membership state machine, driven event by event without sockets."""

import pytest

from ps.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from ps.scheduler.cluster import Cluster
from ps.sharding import TensorSpec


def test_silent_server_is_marked_down_with_the_reason_recorded():
    c = Cluster(heartbeat_interval=1.0, server_timeout=5.0)
    a = c.register("10.0.0.1:7000", now=0.0)
    b = c.register("10.0.0.2:7000", now=0.0)
    assert c.heartbeat(a.server_id, now=4.0, nbytes=10, models=["m"])
    assert c.tick(now=5.5) == [b]
    assert (a.state, b.state) == ("up", "down")
    assert c.transitions[-1].subject == b.server_id
    assert c.transitions[-1].change == "up -> down"
    assert "no heartbeat for 5.5 s" in c.transitions[-1].reason
    assert not c.heartbeat(b.server_id, now=6.0, nbytes=0, models=[])


def test_a_restarted_server_is_a_new_member_and_its_old_entry_goes_down():
    c = Cluster(server_timeout=10.0)
    a = c.register("h:1", now=0.0)
    again = c.register("h:1", now=3.5)  # still listed up: the process restarted and lost its memory
    assert again.server_id != a.server_id and again.state == "up"
    assert a.state == "down" and c.take_downed_by_register() == [a] and c.take_downed_by_register() == []
    assert ("up -> down", "re-registered from the same address (restarted)") in \
        [(t.change, t.reason) for t in c.transitions if t.subject == a.server_id]
    assert c.tick(now=4.0) == []  # already down: tick declares (and returns) only servers it finds silent
    third = c.register("h:1", now=5.0)  # the entry that was down already is forgotten: restarts do not pile up
    assert [s.server_id for s in c.servers.values()] == [again.server_id, third.server_id]
    assert [s.server_id for s in c.up_servers()] == [third.server_id]


def test_plan_uses_up_servers_and_is_stable():
    c = Cluster()
    c.register("h:1", now=0.0)
    c.register("h:2", now=0.0)
    tensors = [TensorSpec("w", (1 << 20,)), TensorSpec("b", (10,))]
    m = c.plan("m", tensors, 1 << 20)
    assert m.servers == ("h:1", "h:2")
    assert c.plan("m", tensors, 1 << 20) is m
    with pytest.raises(AlreadyExists, match="model 'm' already exists with different tensors"):
        c.plan("m", tensors[:1], 1 << 20)
    assert c.drop("m") and not c.drop("m")
    with pytest.raises(NotFound, match="model 'm' is not known to the scheduler"):
        c.shard_map("m")


def test_plan_without_servers_says_how_to_start_one():
    with pytest.raises(FailedPrecondition, match="no parameter servers are up: start one with"):
        Cluster().plan("m", [TensorSpec("w", (3,))], 1024)


def test_register_rejects_an_address_without_port():
    with pytest.raises(InvalidArgument, match="address must be host:port, got 'nohost'"):
        Cluster().register("nohost", now=0.0)
