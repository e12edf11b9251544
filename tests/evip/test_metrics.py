"""Metrics: FLOP counts (by hand and against torch's FlopCounterMode), MFU peaks, the step meter's numbers and
line, sinks and the progress bar."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from evip.job import LoggingConfig
from evip.metrics import (
    CompositeSink, FlopCount, NullSink, Progress, StepMeter, TensorBoardSink, WandbSink, build_sinks, ffn_flops,
    format_count, format_duration, model_flops, peak_flops, peak_flops_for_name,
)
from evip.stages import PARAM_GROUPS, STAGES, set_trainable
from mono import MonoInternVL
from tests.mono.conftest import image_prompt, tiny_config

# image_prompt(2, 4): 5 text + <img> + 2 tiles x 4 context tokens + </img> + 6 text = 21 tokens, 8 of them visual.
NUM_TILES, TOKENS_PER_TILE, NUM_TEXT, NUM_VISUAL = 2, 4, 13, 8


# ------------------------------------------------------------------------------------------------ by hand
def test_forward_flops_of_the_tiny_config_equal_a_count_by_hand():
    # tiny_config: D 64, F 96, V 128, H 4, KV 2, Dh 16, 2 layers; patch 14 on 56 px tiles (4x4 grid), Cv 16,
    # pixel shuffle 0.5 -> 4 tokens per tile of width 4 * 16.
    cfg = tiny_config()
    assert cfg.tokens_per_tile == TOKENS_PER_TILE
    tokens, grid_patches = NUM_TEXT + NUM_VISUAL, 16
    matmuls = [  # (rows, in, out), each 2 * rows * in * out FLOPs
        (NUM_TILES * grid_patches, 3 * 14 * 14, 16),  # patch conv as a matmul
        (NUM_TILES * 4, 64, 64),  # mlp1.1: 4 * Cv -> D
        (NUM_TILES * 4, 64, 64),  # mlp1.3: D -> D
        (tokens, 64, 128),  # lm head
    ]
    for _ in range(2):
        matmuls += [
            (tokens, 64, (4 + 2 * 2) * 16),  # wqkv
            (tokens, 64, 64),  # wo
            (tokens, 64, 96), (tokens, 64, 96), (tokens, 96, 64),  # ONE expert per token: w1, w3, w2
        ]
    forward = sum(2 * r * i * o for r, i, o in matmuls)
    causal_pairs = tokens * (tokens + 1) // 2
    forward += 2 * 4 * 2 * (2 * causal_pairs * 16)  # layers x heads x (scores + values) x 2 * pairs * Dh
    got = model_flops(cfg, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL, seq_lens=[tokens],
                      num_tiles=NUM_TILES, backward=False)
    assert got.total == forward
    assert got.ffn == 2 * 3 * 2 * tokens * 64 * 96
    # Running both experts on every token (the release's dense blend) would double this; routing does not.
    assert got.ffn == ffn_flops(cfg, tokens, backward=False)
    training = model_flops(cfg, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL, seq_lens=[tokens],
                           num_tiles=NUM_TILES)
    assert training.total == 3 * forward and training.ffn == ffn_flops(cfg, tokens)
    assert 0 < training.ffn_share < 1 and training.ffn_share == pytest.approx(got.ffn / forward)


def test_attention_is_counted_per_packed_sample_and_inputs_are_checked():
    cfg = tiny_config()
    one = model_flops(cfg, num_text_tokens=20, num_visual_tokens=0, seq_lens=[20], backward=False)
    packed = model_flops(cfg, num_text_tokens=20, num_visual_tokens=0, seq_lens=[10, 10], backward=False)
    assert one.attention_core == 2 * 4 * 4 * 16 * (20 * 21 // 2)
    assert packed.attention_core == 2 * 4 * 4 * 16 * 2 * (10 * 11 // 2)
    assert packed.total - packed.attention_core == one.total - one.attention_core
    full = model_flops(cfg, num_text_tokens=20, num_visual_tokens=0, seq_lens=[20], backward=False, causal=False)
    assert full.attention_core == 2 * 4 * 4 * 16 * 400
    assert one.patch_embed == one.projector == 0  # a text-only batch runs no tile
    with pytest.raises(ValueError, match="seq_lens add up to 19"):
        model_flops(cfg, num_text_tokens=20, num_visual_tokens=0, seq_lens=[9, 10])
    with pytest.raises(ValueError, match="1 tiles give at most 4"):
        model_flops(cfg, num_text_tokens=1, num_visual_tokens=8, seq_lens=[9], num_tiles=1)
    with pytest.raises(ValueError, match="unknown parameter group"):
        model_flops(cfg, num_text_tokens=1, num_visual_tokens=0, seq_lens=[1], trainable=["vit"])


# ------------------------------------------------------------------------------------------------ FlopCounterMode
def _model_and_inputs(**llm):
    model = MonoInternVL(tiny_config(**llm))
    return model, image_prompt(NUM_TILES, TOKENS_PER_TILE), torch.randn(NUM_TILES, 3, 56, 56)


def test_forward_matches_flop_counter_mode():
    model, ids, pixels = _model_and_inputs()
    expected = model_flops(model.config, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL,
                           seq_lens=[ids.shape[1]], num_tiles=NUM_TILES, backward=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, input_ids=ids)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.convolution"] == expected.patch_embed
    # CPU SDPA runs aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode has no formula for:
    # it counts every matmul except the attention core.
    assert counter.get_total_flops() == expected.total - expected.attention_core
    # The math backend spells attention out as bmm over the full L x L scores (masked, not skipped), so it
    # matches the non-causal count.
    full = model_flops(model.config, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL,
                       seq_lens=[ids.shape[1]], num_tiles=NUM_TILES, backward=False, causal=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, input_ids=ids)
    assert counter.get_total_flops() == full.total


_GROUP_CASES = [
    STAGES["s1.1"].trainable, STAGES["s1.3"].trainable, tuple(PARAM_GROUPS), ("visual_experts",), ("lm_head",),
    ("norms",), ("embeddings", "text_ffn"), ("attention",),
]


@pytest.mark.parametrize(
    "groups, visual_attention_experts",
    [(g, False) for g in _GROUP_CASES]
    + [(("visual_experts",), True), (("attention",), True), (STAGES["s1.3"].trainable, True)],
    ids=lambda v: "+".join(v) if isinstance(v, tuple) else ("attn_experts" if v else "shared_attn"),
)
def test_training_flops_with_frozen_groups_match_flop_counter_mode(groups, visual_attention_experts):
    """Forward + backward as autograd runs it with only ``groups`` trainable (math SDPA, so attention counts)."""
    model, ids, pixels = _model_and_inputs(visual_attention_experts=visual_attention_experts)
    set_trainable(model, groups)
    expected = model_flops(model.config, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL,
                           seq_lens=[ids.shape[1]], num_tiles=NUM_TILES, trainable=groups, causal=False)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == expected.total


@pytest.mark.parametrize("groups", [STAGES["s1.1"].trainable, STAGES["s1.3"].trainable], ids="+".join)
def test_training_flops_with_logits_at_target_positions_match_flop_counter_mode(groups):
    """The trainer's forward: logits only where a target is (``logits_to_keep`` mask), counted by num_logit_tokens."""
    model, ids, pixels = _model_and_inputs()
    set_trainable(model, groups)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, -7:] = True
    keep[:, 3] = True
    expected = model_flops(model.config, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL,
                           seq_lens=[ids.shape[1]], num_tiles=NUM_TILES, trainable=groups, causal=False,
                           num_logit_tokens=int(keep.sum()))
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(pixel_values=pixels, input_ids=ids, logits_to_keep=keep).logits.sum().backward()
    assert counter.get_total_flops() == expected.total
    all_positions = model_flops(model.config, num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL,
                                seq_lens=[ids.shape[1]], num_tiles=NUM_TILES, trainable=groups, causal=False)
    assert expected.lm_head < all_positions.lm_head and expected.ffn == all_positions.ffn
    with pytest.raises(ValueError, match="num_logit_tokens"):
        model_flops(model.config, num_text_tokens=2, num_visual_tokens=0, seq_lens=[2], num_logit_tokens=3)


def test_text_only_training_flops_match_flop_counter_mode():
    model, _, _ = _model_and_inputs()
    ids = torch.randint(3, 96, (1, 17))
    set_trainable(model, STAGES["s1.3"].trainable)
    expected = model_flops(model.config, num_text_tokens=17, num_visual_tokens=0, seq_lens=[17],
                           trainable=STAGES["s1.3"].trainable, causal=False)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() == expected.total


def test_exact_backward_of_a_fully_trained_model_is_the_3x_convention_less_the_pixel_gradient():
    cfg = tiny_config()
    kw = dict(num_text_tokens=NUM_TEXT, num_visual_tokens=NUM_VISUAL, seq_lens=[21], num_tiles=NUM_TILES)
    convention = model_flops(cfg, **kw)
    exact = model_flops(cfg, trainable=PARAM_GROUPS, **kw)
    forward = model_flops(cfg, backward=False, **kw)
    assert exact.total == convention.total - forward.patch_embed
    # Nothing trainable: no backward at all.
    assert model_flops(cfg, trainable=(), **kw).total == forward.total


# ------------------------------------------------------------------------------------------------ peaks
@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA L40S", 362),
        ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA L40", None), ("Tesla T4", None),
    ],
)
def test_peak_flops_table(name, tflops):
    assert peak_flops_for_name(name) == (None if tflops is None else tflops * 1e12)


def test_peak_flops_on_cpu_and_override():
    assert peak_flops("cpu") is None and peak_flops(None) is None
    assert peak_flops("cpu", override_tflops=123.0) == 123e12
    with pytest.raises(ValueError, match="peak_tflops must be positive"):
        peak_flops("cpu", override_tflops=0.0)


# ------------------------------------------------------------------------------------------------ formatting
def test_format_count_and_duration():
    assert [format_count(n) for n in (0, 950, 1234, 999_960, 3.4e6, 5.6e9, 7.8e12, 12.34)] == [
        "0", "950", "1.2k", "1.0M", "3.4M", "5.6B", "7.8T", "12.3",
    ]
    # just below a thousand, three significant digits round up: "1.0k", not "1e+03"
    assert [format_count(n) for n in (999.4, 999.96, -999.96)] == ["999", "1.0k", "-1.0k"]
    assert [format_duration(s) for s in (None, float("nan"), 42, 59.6, 725, 3720, 2 * 86400 + 3 * 3600)] == [
        "?", "?", "42s", "1m00s", "12m05s", "1h02m", "2d03h",
    ]


# ------------------------------------------------------------------------------------------------ step meter
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _run_steps(meter, clock, steps, *, first=1, wait=0.1, compute=0.9, loss=2.0, skipped=None):
    for step in range(first, first + steps):
        with meter.data_wait():
            clock.t += wait
        meter.add_batch(text_tokens=1000, visual_tokens=3000, samples=4,
                        flops=FlopCount(ffn=2e11, attention_proj=1e11, lm_head=1e11))
        clock.t += compute
        meter.end_step(step, loss=loss, lr=1.2e-4, grad_norm=0.84, loss_weight=1.0, skipped=skipped)


def test_step_meter_numbers_and_line():
    clock = FakeClock()
    meter = StepMeter(total_steps=100, peak_flops=1e12, clock=clock)
    _run_steps(meter, clock, 10, skipped={"corrupt_image": 2, "too_long": 1})
    report = meter.report()
    m = report.metrics
    # 10 steps of 1 s: 10k text and 30k visual tokens in 10 s, 4e11 FLOPs per step on a 1e12 FLOP/s device.
    assert m["tokens_per_s/text"] == pytest.approx(1000) and m["tokens_per_s/visual"] == pytest.approx(3000)
    assert m["tokens_per_s_device/text"] == pytest.approx(1000) and m["samples_per_s"] == pytest.approx(4)
    assert m["tflops_per_device"] == pytest.approx(0.4) and m["mfu"] == pytest.approx(0.4)
    assert m["mfu/ffn"] == pytest.approx(0.2) and m["flops/ffn_share"] == pytest.approx(0.5)
    assert m["data_wait_share"] == pytest.approx(0.1) and m["time/step_s"] == pytest.approx(1.0)
    assert m["loss"] == 2.0 and m["lr"] == 1.2e-4 and m["grad_norm"] == 0.84
    assert m["skipped/corrupt_image"] == 2 and m["skipped/too_long"] == 1 and m["skipped/total"] == 3
    assert m["mem/peak_gib"] > 0 and m["nonfinite_steps"] == 0
    assert m["eta_s"] == pytest.approx(90.0)  # 90 steps left at 1 s
    assert report.step == 10
    assert report.line == (
        "step 10/100 | loss 2.0000 | lr 1.2e-04 | gnorm 0.84 | tok/s/dev text 1.0k vis 3.0k | mfu 40.0% | "
        f"data 10% | mem {m['mem/peak_gib']:.1f} GiB | eta 1m30s | skipped 3 (corrupt_image 2, too_long 1)"
    )


def test_step_meter_window_resets_and_eta_skips_the_first_step():
    clock = FakeClock()
    meter = StepMeter(total_steps=1000, clock=clock)
    _run_steps(meter, clock, 1, wait=0.0, compute=100.0)  # compilation
    assert meter.eta_seconds is None
    first = meter.report()
    assert "eta ?" in first.line and "eta_s" not in first.metrics
    assert "tflops/dev" in first.line and "mfu" not in first.metrics  # no peak known: no MFU
    _run_steps(meter, clock, 4, first=2, wait=0.5, compute=1.5)
    second = meter.report()
    assert meter.eta_seconds == pytest.approx(2.0 * 995)  # mean of steps 2..5, not the 100 s first step
    assert "eta 33m10s" in second.line
    # The new window holds only steps 2..5: 4 steps of 2 s.
    assert second.metrics["tokens_per_s/text"] == pytest.approx(4000 / 8)
    assert second.metrics["data_wait_share"] == pytest.approx(0.25)
    with pytest.raises(RuntimeError, match="no end_step"):
        meter.report()


def test_step_meter_weighted_loss_and_nonfinite_steps():
    clock = FakeClock()
    meter = StepMeter(total_steps=10, clock=clock)
    for step, (loss, weight, bad) in enumerate([(1.0, 3.0, False), (float("nan"), 5.0, True), (3.0, 1.0, False)], 1):
        meter.add_batch(text_tokens=10, visual_tokens=0, samples=1)
        clock.t += 1.0
        meter.end_step(step, loss=loss, lr=1e-3, grad_norm=float("inf") if bad else float(step), loss_weight=weight,
                       nonfinite=bad)
    report = meter.report()
    assert report.metrics["loss"] == pytest.approx((1.0 * 3 + 3.0 * 1) / 4)
    assert report.metrics["grad_norm"] == 3.0 and report.metrics["nonfinite_steps"] == 1
    assert report.line.endswith("| nonfinite 1") and "skipped" not in report.line


def test_step_meter_combines_ranks():
    """Two ranks through an injected gather: counts add, time and data wait take the slowest, memory the max."""
    other = {}

    def gather(payload):
        rank1 = dict(payload, text=payload["text"] * 3, visual=0, time=payload["time"] * 2,
                     data_wait=payload["data_wait"] * 4, mem=payload["mem"] * 10, skipped={"too_long": 5})
        other.update(rank1)
        return [payload, rank1]

    clock = FakeClock()
    meter = StepMeter(total_steps=100, peak_flops=1e12, gather=gather, clock=clock)
    _run_steps(meter, clock, 5, skipped={"corrupt_image": 1, "too_long": 1})
    m = meter.report().metrics
    # Rank 0 saw 5k text tokens in 5 s, rank 1 15k in 10 s: 20k tokens over the slowest rank's 10 s.
    assert m["tokens_per_s/text"] == pytest.approx(2000) and m["tokens_per_s_device/text"] == pytest.approx(1000)
    assert m["tokens_per_s/visual"] == pytest.approx(1500)
    assert m["tflops_per_device"] == pytest.approx(2 * 2e12 / 2 / 10 / 1e12)
    assert m["data_wait_share"] == pytest.approx(other["data_wait"] / other["time"])
    assert m["mem/peak_gib"] == pytest.approx(other["mem"] / 2**30)
    assert m["skipped/too_long"] == 6 and m["skipped/corrupt_image"] == 1


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: rank r sees 100 (r + 1) text tokens per step and steps of 1 + r seconds."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        clock = FakeClock()
        meter = StepMeter(total_steps=10, clock=clock)  # default gather: all_gather_object
        for step in (1, 2):
            meter.add_batch(text_tokens=100 * (rank + 1), visual_tokens=10, samples=1)
            clock.t += 1.0 + rank
            meter.end_step(step, loss=1.0 + rank, lr=1e-4, grad_norm=1.0, skipped={f"reason{rank}": rank + 1})
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(meter.report().metrics, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_step_meter_over_two_gloo_ranks(tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    m0, m1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert m0 == m1  # every rank gets the same numbers
    # 2 x (100 + 200) text tokens over the slower rank's 4 s; two devices.
    assert m0["tokens_per_s/text"] == pytest.approx(150) and m0["tokens_per_s_device/text"] == pytest.approx(75)
    assert m0["tokens_per_s/visual"] == pytest.approx(10)
    assert m0["loss"] == pytest.approx(1.5) and m0["skipped/reason0"] == 1 and m0["skipped/reason1"] == 2


# ------------------------------------------------------------------------------------------------ sinks
def test_tensorboard_sink_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardSink(tmp_path / "tb", config={"stage": "s1.1"}) as sink:
        sink.log(10, {"loss": 2.5, "mfu": 0.4})
        sink.log(20, {"loss": 2.0, "mfu": 0.41})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [(10, 2.5), (20, 2.0)]


def test_missing_backends_give_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        TensorBoardSink(tmp_path / "tb")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbSink("proj", "run", {})
    # wandb is never imported unless configured, and tensorboard not when switched off.
    sink = build_sinks(LoggingConfig(tensorboard=False), tmp_path, rank=0, run_config={})
    assert isinstance(sink, NullSink)
    with pytest.raises(ImportError, match="wandb_project is 'proj'"):
        build_sinks(LoggingConfig(tensorboard=False, wandb_project="proj"), tmp_path, rank=0, run_config={})


def test_build_sinks_per_rank(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = LoggingConfig(tensorboard=True)
    assert isinstance(build_sinks(cfg, tmp_path / "r1", rank=1, run_config={}), NullSink)
    assert not (tmp_path / "r1").exists()
    sink = build_sinks(cfg, tmp_path / "r0", rank=0, run_config={"lr": 1e-4})
    assert isinstance(sink, TensorBoardSink) and sink.log_dir == tmp_path / "r0" / "tb"
    sink.close()

    class Recorder(NullSink):
        def __init__(self):
            self.seen, self.closed = [], False

        def log(self, step, metrics):
            self.seen.append((step, dict(metrics)))

        def close(self):
            self.closed = True

    a, b = Recorder(), Recorder()
    with CompositeSink([a, b]) as both:
        both.log(3, {"loss": 1.0})
    assert a.seen == b.seen == [(3, {"loss": 1.0})] and a.closed and b.closed


# ------------------------------------------------------------------------------------------------ progress
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_no_op_without_a_terminal(capsys):
    bar_stream = io.StringIO()
    progress = Progress(100, mode="auto", file=bar_stream)
    assert not progress.enabled
    progress.update(5, loss=1.0)
    progress.write("step 5/100 | loss 1.0000")
    progress.close()
    assert capsys.readouterr().out == "step 5/100 | loss 1.0000\n" and bar_stream.getvalue() == ""
    silent = Progress(100, mode="on", rank=1, file=_Tty())
    assert not silent.enabled
    silent.write("from rank 1")
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="logging.progress"):
        Progress(10, mode="yes")


@pytest.mark.parametrize("mode, stream", [("auto", _Tty), ("on", io.StringIO)])
def test_progress_bar_on_rank_0(capsys, mode, stream):
    pytest.importorskip("tqdm")
    bar_stream = stream()
    with Progress(100, initial=10, mode=mode, file=bar_stream) as progress:
        assert progress.enabled
        progress.update(12, loss=2.3412)
        progress.write("step 12/100 | loss 2.3412")
        assert progress._bar.n == 12
    assert capsys.readouterr().out == "step 12/100 | loss 2.3412\n"
    assert "12/100" in bar_stream.getvalue() and "loss 2.3412" in bar_stream.getvalue()
