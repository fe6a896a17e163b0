"""The timeline simulator against the textbook results on synthetic stage costs."""

import math

import pytest

from lctrun.projection.timeline import (
    FREE,
    Compute,
    Link,
    StageCost,
    Timeline,
    colocated,
    data_parallel_bp,
    device_of,
    layer_parallel,
    layer_serial_bp,
    local_method,
    makespan,
    pipelined_bp,
    steady_seconds_per_batch,
)


def equal(k, forward=1.0, backward=2.0, **kw):
    return [StageCost(forward, backward, **kw) for _ in range(k)]


@pytest.mark.parametrize("k, m", [(2, 2), (4, 4), (4, 8), (3, 5), (8, 8)])
def test_gpipe_takes_m_plus_k_minus_1_stage_steps(k, m):
    assert math.isclose(makespan(pipelined_bp(equal(k), m, 1, "gpipe")), (m + k - 1) * 3.0)


@pytest.mark.parametrize("k, m", [(2, 2), (4, 4), (4, 8), (3, 5), (8, 16)])
def test_1f1b_takes_as_long_as_gpipe_with_at_most_k_in_flight(k, m):
    timeline = Timeline()
    seconds = timeline.play(pipelined_bp(equal(k), m, 1, "1f1b"))
    assert math.isclose(seconds, (m + k - 1) * 3.0)
    assert max(timeline.in_flight(d) for d in range(k)) == k  # GPipe holds all M
    gpipe = Timeline()
    gpipe.play(pipelined_bp(equal(k), m, 1, "gpipe"))
    assert gpipe.in_flight(0) == m


def test_layer_serial_bp_is_the_sum_of_the_stages():
    stages = [StageCost(1.0, 2.0, 0.5), StageCost(3.0, 1.0, 0.25), StageCost(0.5, 0.5, 0.0)]
    assert math.isclose(steady_seconds_per_batch(lambda n: layer_serial_bp(stages, n)), 8.75)
    assert math.isclose(makespan(layer_serial_bp(stages, 4)), 4 * 8.75)


@pytest.mark.parametrize("method", ["lct", "dgl", "dni"])
def test_a_local_method_at_depth_2_runs_at_its_busiest_stage(method):
    stages = [
        StageCost(1.0, 2.0, 0.1, aux_forward=0.3, aux_backward=0.3, aux_update=0.4),
        StageCost(2.0, 3.0, 0.2, aux_forward=0.2, aux_backward=0.2, aux_update=0.3),
        StageCost(1.5, 1.5, 0.1),
    ]
    busiest = max(
        s.forward + s.backward + s.optimizer + (s.aux_forward + s.aux_backward + s.aux_update if k < 2 else 0)
        for k, s in enumerate(stages)
    )
    if method == "dgl":  # no feedback, so no auxiliary update at feedback
        busiest = max(s.forward + s.backward + s.optimizer + s.aux_forward + s.aux_backward for s in stages)
    per_batch = steady_seconds_per_batch(lambda n: local_method(stages, method, 2, n, 4.0))
    assert math.isclose(per_batch, busiest)


def test_dni_at_depth_1_waits_for_the_true_gradient():
    # two stages: stage 0 cannot start batch t+1 before stage 1 has stepped batch t and sent its gradient
    stages = [StageCost(1.0, 1.0, aux_forward=0.5, aux_update=0.5), StageCost(2.0, 2.0)]
    per_batch = steady_seconds_per_batch(lambda n: local_method(stages, "dni", 1, n, 4.0))
    assert math.isclose(per_batch, 1.5 + 4.0 + 0.5)  # stage 0's forward, stage 1's step, the synthesizer update
    overlapped = steady_seconds_per_batch(lambda n: local_method(stages, "dni", 2, n, 4.0))
    assert math.isclose(overlapped, 4.0)


def test_lct_at_depth_1_overlaps_the_next_stage_backward():
    stages = [StageCost(1.0, 1.0, aux_forward=0.5, aux_backward=0.5, aux_update=0.5), StageCost(2.0, 2.0)]
    per_batch = steady_seconds_per_batch(lambda n: local_method(stages, "lct", 1, n, 4.0))
    # stage 0 waits for stage 1's loss (after its forward), not for its backward
    assert math.isclose(per_batch, max(1.5 + 2.0 + 0.5, 1.5 + 1.5 + 0.5, 4.0))


def test_links_add_transfer_time_and_latency():
    link = Link(bandwidth=100.0, latency=0.5)
    stages = [StageCost(1.0, 1.0, out_bytes=100.0), StageCost(1.0, 1.0)]
    # forward message 1 s + 0.5 s, gradient back the same
    assert math.isclose(makespan(layer_serial_bp(stages, 1), link), 4.0 + 3.0)


def test_data_parallel_ring_all_reduce():
    blocks = [StageCost(1.0, 2.0, 0.5, param_bytes=600.0)]
    link = Link(bandwidth=100.0, latency=0.0)
    for k in (2, 3, 4):
        # 2 (K-1) rounds of 600 / K bytes per link after the backward, then the step
        expected = 3.0 + 2 * (k - 1) * 6.0 / k + 0.5
        assert math.isclose(makespan(data_parallel_bp(blocks, k, 1), link), expected)
    assert math.isclose(makespan(data_parallel_bp(blocks, 1, 1), link), 3.5)


def test_data_parallel_buckets_overlap_the_backward():
    blocks = [StageCost(0.5, 1.0, param_bytes=100.0) for _ in range(4)]
    link = Link(bandwidth=100.0, latency=0.0)  # each bucket's all-reduce on 2 devices: 2 x 0.5 s
    one_bucket = makespan(data_parallel_bp(blocks, 2, 1, bucket_bytes=1e9), link)
    per_block = makespan(data_parallel_bp(blocks, 2, 1, bucket_bytes=100.0), link)
    assert math.isclose(one_bucket, 2.0 + 4.0 + 4 * 1.0)
    assert math.isclose(per_block, 2.0 + 4.0 + 1.0)  # only the last bucket's reduce is left after the backward
    assert device_of(("comm", 1)) == 1


def test_layer_parallel_pipelines_from_the_last_stage():
    stages = equal(3, 1.0, 1.0)
    per_batch = steady_seconds_per_batch(lambda n: layer_parallel(stages, 4, n, [8.0, 8.0]))
    assert math.isclose(per_batch, 2.0)
    assert math.isclose(makespan(layer_parallel(stages, 4, 1, [8.0, 8.0]), FREE), 6.0)


def test_a_schedule_that_cannot_run_is_reported():
    from lctrun.projection.timeline import Compute

    with pytest.raises(RuntimeError, match="deadlocks"):
        Timeline().play({0: [Compute("a", 1.0, ("b",))], 1: [Compute("b", 1.0, ("a",))]})


def test_colocated_devices_slow_each_other_only_while_both_compute():
    """Two devices of one machine: a Compute runs `slowdown` times slower while the other computes."""
    both = {0: [Compute("a", 1.0)], 1: [Compute("b", 1.0)]}
    assert math.isclose(makespan(both, FREE, 1.2), 1.2, rel_tol=1e-6)  # side by side all along
    short = {0: [Compute("a", 1.0)], 1: [Compute("b", 0.5)]}
    # b: 0.5 s of work at 1/1.2 -> 0.6 s; a: 0.5 s of its work done in those 0.6 s, then 0.5 s alone
    timeline = colocated(short, FREE, 1.2)
    assert math.isclose(timeline.play(short), 1.1, rel_tol=1e-6)
    assert math.isclose(timeline.done["b"], 0.6, rel_tol=1e-6)
    stages = [StageCost(1.0, 2.0, optimizer=0.5), StageCost(1.5, 2.5)]
    chain = layer_serial_bp(stages, 3)  # model-parallel bp: one device computes at a time
    assert math.isclose(makespan(chain, FREE, 1.5), makespan(chain), rel_tol=1e-9)
    per_batch = steady_seconds_per_batch(lambda n: data_parallel_bp([StageCost(1.0, 2.0)], 2, n), FREE, slowdown=1.1)
    assert math.isclose(per_batch, 1.1 * 3.0, rel_tol=1e-6)  # replicas in lockstep feel all of it
