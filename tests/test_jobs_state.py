"""The scheduler's job/task/lease state machine, driven event by event without sockets."""

import pytest

from ps.errors import FailedPrecondition, NotFound
from ps.scheduler.jobs import Jobs

PREP = {"shards": 2}


def running(epochs=1, lease=10.0):
    jobs = Jobs()
    job = jobs.submit("j", "{}", PREP, epochs=epochs, lease_timeout=lease, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 1.0)
    return jobs, job


def test_an_expired_lease_requeues_the_task_and_drops_the_late_result():
    jobs, job = running(lease=10.0)
    task, _ = jobs.lease("w1", now=2.0)
    first_lease = task.lease_id
    assert jobs.extend("w1", now=5.0) == []          # a heartbeat extends the lease to 15
    assert jobs.expire(now=14.0) == []
    assert [t.task_id for t in jobs.expire(now=15.5)] == [task.task_id]
    again, _ = jobs.lease("w2", now=16.0)
    assert again.task_id == task.task_id and again.lease_id != first_lease
    assert not jobs.complete(task.task_id, first_lease, now=17.0, samples=10)   # w1 was too late
    assert jobs.complete(again.task_id, again.lease_id, now=17.0, samples=10)
    assert jobs.transitions[-1].change == "leased -> done"
    assert any(t.reason == f"lease {first_lease} of w1 expired" for t in jobs.transitions)


def test_an_epoch_queues_its_eval_and_the_last_eval_ends_the_job():
    jobs, job = running(epochs=2)
    for _ in range(2):
        t, _ = jobs.lease("w", 2.0)
        assert t.kind == "train" and t.epoch == 0
        jobs.complete(t.task_id, t.lease_id, 3.0, samples=50, steps=2, loss_sum=25.0)
    kinds = []
    while (leased := jobs.lease("w", 4.0)) is not None:
        t, _ = leased
        kinds.append((t.kind, t.epoch))
        jobs.complete(t.task_id, t.lease_id, 5.0, samples=40, steps=2, loss_sum=8.0, correct=36)
    assert kinds == [("eval", 0), ("train", 1), ("train", 1), ("eval", 1)]
    assert job.state == "succeeded"
    assert job.metrics["epoch"] == 2 and job.metrics["test_accuracy"] == 0.9
    assert job.metrics["train_loss"] == pytest.approx(0.2)
    assert job.metrics["samples"] == 180 and job.metrics["steps"] == 8
    assert [e.state for e in job.events if e.kind == "state"] == ["queued", "starting", "running", "succeeded"]


def test_an_epoch_evaluated_in_parts_reports_once_from_the_sums_of_its_parts():
    jobs = Jobs()
    job = jobs.submit("j", "{}", {"shards": 2, "eval_shards": 3}, epochs=1, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 1.0)
    assert job.tasks_total == 5
    for _ in range(2):
        t, _ = jobs.lease("w", 2.0)
        jobs.complete(t.task_id, t.lease_id, 3.0, samples=50, steps=2, loss_sum=25.0)
    parts = [jobs.lease(f"w{i}", 4.0)[0] for i in range(3)]  # side by side, on three workers
    assert [(t.task_id, t.kind, t.shard, t.shards) for t in parts] == \
        [(f"{job.job_id}/eval-0-{i}", "eval", i, 3) for i in range(3)]
    assert jobs.lease("w3", 4.0) is None
    results = [(34, 3.0, 30), (33, 6.0, 21), (33, 4.0, 30)]  # (samples, loss_sum, correct) of each part
    for t, (n, loss, correct) in zip(parts[:2], results):
        jobs.complete(t.task_id, t.lease_id, 5.0, samples=n, loss_sum=loss, correct=correct)
        assert job.metrics["epoch"] == 0 and job.state == "running"  # not before every part is in
    assert not [e for e in job.events if e.kind == "epoch"]
    n, loss, correct = results[2]
    jobs.complete(parts[2].task_id, parts[2].lease_id, 6.0, samples=n, loss_sum=loss, correct=correct)
    assert job.metrics["epoch"] == 1 and job.state == "succeeded" and job.tasks_done == 5
    assert job.metrics["test_accuracy"] == 81 / 100 and job.metrics["test_loss"] == pytest.approx(13.0 / 100)
    assert [e.message for e in job.events if e.kind == "epoch"] == ["epoch 1/1: test accuracy 0.8100"]
    assert job.epoch_eval == {}


def test_eval_every_evaluates_every_nth_epoch_and_the_last_and_counts_only_those_tasks():
    jobs = Jobs()
    job = jobs.submit("j", '{"eval_every": 2}', PREP, epochs=5, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 1.0)
    assert job.tasks_total == 5 * 2 + 3  # epochs 2, 4 and 5 (the last) are evaluated
    kinds = []
    while (leased := jobs.lease("w", 2.0)) is not None:
        t, _ = leased
        kinds.append((t.kind, t.epoch))
        jobs.complete(t.task_id, t.lease_id, 3.0, samples=40, steps=2, loss_sum=8.0, correct=30 + t.epoch)
    assert [k for k in kinds if k[0] == "eval"] == [("eval", 1), ("eval", 3), ("eval", 4)]
    assert len(kinds) == job.tasks_total == job.tasks_done and job.state == "succeeded"
    assert [e.message for e in job.events if e.kind == "epoch"] == [
        "epoch 1/5: trained (evaluated every 2 epochs)", "epoch 2/5: test accuracy 0.7750",
        "epoch 3/5: trained (evaluated every 2 epochs)", "epoch 4/5: test accuracy 0.8250",
        "epoch 5/5: test accuracy 0.8500"]
    assert job.metrics["epoch"] == 5 and job.evaluated == 5 and job.metrics["test_accuracy"] == 34 / 40
    resumed = jobs.submit("j", '{"eval_every": 2}', PREP, epochs=5, lease_timeout=10.0, now=4.0, start_epoch=3)
    assert resumed.tasks_done == 3 * 2 + 1 and resumed.tasks_total == job.tasks_total


def test_a_task_error_fails_the_job_with_the_workers_message():
    jobs, job = running()
    t, _ = jobs.lease("w7", 2.0)
    jobs.complete(t.task_id, t.lease_id, 3.0, error="FileNotFoundError: no such dataset file: x.csv")
    assert job.state == "failed"
    assert job.error == f"train task {t.task_id} failed on w7: FileNotFoundError: no such dataset file: x.csv"
    assert jobs.lease("w7", 4.0) is None


def test_cancel_drops_pending_tasks_and_tells_the_lease_holder():
    jobs, job = running()
    t, _ = jobs.lease("w1", 2.0)
    jobs.cancel(job.job_id, 3.0)
    assert jobs.lease("w2", 3.0) is None
    assert jobs.extend("w1", 4.0) == [t.task_id]
    assert not jobs.complete(t.task_id, t.lease_id, 5.0, samples=1)
    with pytest.raises(FailedPrecondition, match="already cancelled"):
        jobs.cancel(job.job_id, 6.0)
    with pytest.raises(NotFound, match="job 'job-9' not found"):
        jobs.cancel("job-9", 6.0)


def test_a_running_job_without_workers_is_warned_about_once():
    jobs, job = running()
    assert jobs.warn_idle(have_workers=False, now=2.0) == [job]
    assert jobs.warn_idle(have_workers=False, now=3.0) == []
    assert job.events[-1].kind == "warning" and "no workers are registered" in job.events[-1].message
    assert jobs.warn_idle(have_workers=True, now=4.0) == []
    assert jobs.warn_idle(have_workers=False, now=5.0) == [job]


def test_an_idle_worker_starts_the_next_epoch_instead_of_waiting_at_the_barrier():
    jobs, job = running(epochs=3)
    a, _ = jobs.lease("w1", 2.0)
    b, _ = jobs.lease("w2", 2.0)
    jobs.complete(a.task_id, a.lease_id, 3.0, samples=10)
    c, _ = jobs.lease("w1", 3.0)                  # epoch 0 still running on w2: look ahead
    assert (c.kind, c.epoch) == ("train", 1)
    d, _ = jobs.lease("w3", 3.0)
    assert (d.kind, d.epoch) == ("train", 1)
    assert jobs.lease("w4", 3.0) is None          # never more than one epoch ahead
    jobs.complete(b.task_id, b.lease_id, 4.0, samples=10)
    e, _ = jobs.lease("w2", 4.0)
    assert (e.kind, e.epoch) == ("eval", 0)       # epoch 0's eval, ahead of anything else


def test_the_epoch_a_job_reports_counts_only_epochs_finished_in_order():
    """asp with eval_every 2: epoch 3 (not evaluated) trains while epoch 2's evaluation is still out. The
    epochs a checkpoint says it holds (a job resumed from it starts after them) must not pass epoch 2's
    until that evaluation is in; the job's reported epoch is the latest finished."""
    jobs = Jobs()
    job = jobs.submit("j", '{"eval_every": 2}', PREP, epochs=4, lease_timeout=10.0, now=0.0)
    jobs.mark_starting(job.job_id, 0.0)
    jobs.start(job.job_id, 1.0)

    def train(epoch, now):
        for _ in range(2):
            t, _ = jobs.lease("w", now)
            assert (t.kind, t.epoch) == ("train", epoch)
            jobs.complete(t.task_id, t.lease_id, now, samples=10, steps=1)
    train(0, 2.0)
    assert job.finished == job.metrics["epoch"] == 1          # not evaluated: finished with its training
    train(1, 3.0)
    out, _ = jobs.lease("slow", 4.0)                          # epoch 2's evaluation, on a slow worker
    assert (out.kind, out.epoch) == ("eval", 1)
    train(2, 5.0)                                             # the next epoch runs meanwhile
    assert (job.metrics["epoch"], job.finished, job.evaluated) == (3, 1, 0)
    assert job.tasks_done == 6 and job.tasks_before(job.finished) == 2
    jobs.complete(out.task_id, out.lease_id, 6.0, samples=10, correct=7)
    assert (job.metrics["epoch"], job.finished, job.evaluated) == (3, 3, 2) and job.metrics["test_accuracy"] == 0.7
    assert job.tasks_done == job.tasks_before(3)


def test_a_job_whose_later_epochs_finish_first_waits_for_the_dead_workers_task_and_loses_nothing():
    """asp: epoch 0's task is held by a worker that died; the next epoch runs ahead and finishes. The job
    must not succeed without the held task: it runs again once the lease expires, then its eval."""
    jobs, job = running(epochs=2, lease=10.0)
    held, _ = jobs.lease("dead", 2.0)
    rest, _ = jobs.lease("w", 2.0)
    jobs.complete(rest.task_id, rest.lease_id, 3.0, samples=10, steps=1)
    ahead = [jobs.lease("w", 3.0 + i)[0] for i in range(2)]   # epoch 1, while epoch 0 is held
    assert [(t.kind, t.epoch) for t in ahead] == [("train", 1), ("train", 1)]
    for t in ahead:
        jobs.complete(t.task_id, t.lease_id, 5.0, samples=10, steps=1)
    last, _ = jobs.lease("w", 6.0)
    assert (last.kind, last.epoch) == ("eval", 1)
    jobs.complete(last.task_id, last.lease_id, 6.5, samples=10, loss_sum=1.0, correct=9)
    # epoch 2's accuracy is in, but no epoch has finished in order: a checkpoint now holds 0 epochs
    assert job.state == "running" and job.metrics["epoch"] == 2 and job.metrics["test_accuracy"] == 0.9
    assert job.finished == 0
    assert jobs.lease("w", 7.0) is None                       # only the held task is left
    assert [t.task_id for t in jobs.expire(now=12.5)] == [held.task_id]
    again, _ = jobs.lease("w", 13.0)
    assert again.task_id == held.task_id
    jobs.complete(again.task_id, again.lease_id, 14.0, samples=10, steps=1)
    assert job.finished == 0                                  # epoch 1's evaluation is still to come
    late, _ = jobs.lease("w", 14.5)
    assert (late.kind, late.epoch) == ("eval", 0)
    jobs.complete(late.task_id, late.lease_id, 15.0, samples=10, loss_sum=5.0, correct=5)
    assert job.state == "succeeded" and job.tasks_done == job.tasks_total == 6
    assert job.metrics["steps"] == 4 and job.metrics["samples"] == 40
    # the last epoch's evaluation stays the job's result; the late one is reported as what it is
    assert (job.metrics["epoch"], job.finished, job.metrics["test_accuracy"]) == (2, 2, 0.9)
    assert [e.message for e in job.events if e.kind == "epoch"] == ["epoch 2/2: test accuracy 0.9000",
                                                                    "epoch 1/2: test accuracy 0.5000"]
