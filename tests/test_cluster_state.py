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
    assert a.state == "down"
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


def test_a_server_found_unreachable_is_marked_down_at_once_and_gets_no_new_models():
    c = Cluster(heartbeat_interval=1.0, server_timeout=5.0)
    a, b = c.register("h:1", 0.0), c.register("h:2", 0.0)
    assert c.mark_down("h:2", 1.0, "unreachable: health check failed") is b
    assert (b.state, c.transitions[-1].change, c.transitions[-1].reason) == \
        ("down", "up -> down", "unreachable: health check failed")
    assert c.mark_down("h:2", 1.5, "again") is None and c.mark_down("nowhere:1", 1.5, "x") is None
    assert not c.heartbeat(b.server_id, 2.0, 0, [])  # it must register again, as a new member
    m = c.plan("m", [TensorSpec("w", (4,))], 1 << 20)
    assert m.servers == ("h:1",) and m.replicas == (("h:1",),) and m.ids == ((a.server_id,),)


def test_plan_places_replicas_on_the_next_servers_and_skips_drained_ones():
    c = Cluster()
    ids = [c.register(f"h:{i}", 0.0).server_id for i in range(3)]
    m = c.plan("m", [TensorSpec("w", (3, 200_000))], 1 << 20)  # >= 1 MiB: one slice per server
    assert m.replication == 2 and m.version == 1
    assert m.replicas == (("h:0", "h:1"), ("h:1", "h:2"), ("h:2", "h:0"))
    assert m.ids == ((ids[0], ids[1]), (ids[1], ids[2]), (ids[2], ids[0]))
    with pytest.raises(InvalidArgument, match=r"replicas must be in \[1, 3\]"):
        c.plan("n", [TensorSpec("w", (4,))], 1 << 20, replicas=4)
    c.draining.add("h:0")
    assert c.plan("d", [TensorSpec("w", (4,))], 1 << 20).servers == ("h:1", "h:2")


def test_a_registration_retried_by_the_same_process_keeps_its_id():
    c = Cluster()
    first = c.register("h:1", 0.0, instance="proc-a")
    assert c.register("h:1", 0.5, instance="proc-a") is first  # the reply was lost: same member
    assert [s.server_id for s in c.servers.values()] == [first.server_id] and first.state == "up"
    again = c.register("h:1", 1.0, instance="proc-b")  # another process at that address
    assert again.server_id != first.server_id and first.state == "down"
    c.tick(100.0)  # declared down for silence: the same process registering again is a new member
    assert c.register("h:1", 101.0, instance="proc-b").server_id not in (first.server_id, again.server_id)
