"""`auto`: the measured choice of backend and precision, cached and reused; forced flags; native
bfloat16 (simulated either way); the agreement rule; the core budget."""
from __future__ import annotations

import pytest
import torch

import visionzoo
from visionzoo.enums import Precision
from visionzoo.runtime import autotune, backends
from visionzoo.runtime.autotune import Candidate, candidates
from visionzoo.runtime.backends import Backend, Runner, TorchRunner, installed_backends, open_runner
from visionzoo.runtime.machine import FORCE_BF16_ENV, capabilities, split_cores
from visionzoo.weights.records import Preprocess


@pytest.fixture
def measuring(monkeypatch):
    """`auto` measures (the other tests switch it off), between torch and ONNX Runtime only: OpenVINO
    would add its compile time and test nothing more."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("VISIONZOO_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "installed_backends", lambda: [Backend.TORCH, Backend.ONNXRUNTIME])


def tiny_model(seed: int = 0):
    """A small classifier on 32-pixel inputs: every measurement takes a few seconds. Its weights (from
    `seed`) key the cached measurements: each test measures a model of its own."""
    torch.manual_seed(seed)
    net = visionzoo.create_model("mobilenet_v3_small", num_classes=10)
    net.card = net.card.replace(preprocess=Preprocess(36, 32))
    return net


@pytest.mark.slow  # an ONNX export and two candidates on 200 images: about 30 s here
def test_the_choice_is_measured_once_then_read_back(measuring, monkeypatch):
    monkeypatch.setenv(FORCE_BF16_ENV, "0")  # the same two candidates on a CPU with native bfloat16
    net = tiny_model()
    first = open_runner(net, threads=1, batch_size=8)
    choice = first.choice
    assert choice is not None and choice.measured and not choice.cached
    assert (first.backend.value, first.precision) == (choice.backend, choice.precision)
    assert {t.label for t in choice.trials} == {"torch fp32", "onnxruntime fp32"}
    chosen = [t for t in choice.trials if t.verdict == "chosen"]
    assert len(chosen) == 1 and chosen[0].agreement >= autotune.MIN_AGREEMENT
    assert "200 check images" in choice.reason and "batch 8, 1 thread" in choice.reason

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(autotune._Tuner, "_measure", no_measuring)
    again = open_runner(net, threads=1, batch_size=8)
    assert again.choice.cached and (again.backend, again.precision) == (first.backend, first.precision)
    assert again.choice.reason == choice.reason
    support = backends.auto_support()
    assert autotune.cached_choice(net, support, threads=1, batch_size=8).label == choice.label
    # other conditions (the thread count) are another measurement
    assert autotune.cached_choice(net, support, threads=2, batch_size=8) is None


def test_forced_backend_and_precision_win(measuring, monkeypatch):
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured although both were forced")

    monkeypatch.setattr(autotune._Tuner, "_measure", no_measuring)
    net = tiny_model(2)
    runner = open_runner(net, "onnxruntime", precision="fp32")
    assert runner.backend is Backend.ONNXRUNTIME and runner.choice is None
    runner = open_runner(net, "torch", precision="bf16")
    assert runner.backend is Backend.TORCH and runner.precision is Precision.BF16 and runner.choice is None
    monkeypatch.setenv(FORCE_BF16_ENV, "0")
    runner = open_runner(net, "torch")  # precision auto, and a single candidate: nothing to measure
    assert runner.precision is Precision.FP32 and runner.choice.reason.startswith("the only candidate")


def test_without_native_bf16_auto_stays_fp32_and_says_so(monkeypatch):
    monkeypatch.setenv(FORCE_BF16_ENV, "0")
    assert not capabilities().native_bf16
    installed = [b.value for b in installed_backends()]
    found, notes = candidates("auto", Precision.AUTO, installed, is_file=False)
    assert found and all(c.precision is Precision.FP32 for c in found)
    assert notes == [f"bfloat16 not considered: native bfloat16 forced off by {FORCE_BF16_ENV}=0 "
                     f"(the CPU: torch: {capabilities().torch_isa}; OpenVINO: "
                     + (", ".join(capabilities().openvino) if capabilities().openvino is not None
                        else "not installed") + ")"]


def test_with_native_bf16_a_bf16_candidate_is_measured(measuring, monkeypatch):
    monkeypatch.setenv(FORCE_BF16_ENV, "1")  # this CPU may have none: simulated (bf16 then runs emulated)
    found, notes = candidates("auto", Precision.AUTO, ["torch", "onnxruntime"], is_file=False)
    assert Candidate("torch", Precision.BF16) in found and not notes
    assert Candidate("torch", Precision.BF16, recheck=True) in found  # and with float32 near ties
    assert Candidate("onnxruntime", Precision.BF16) not in found  # float32 kernels only
    forced, _ = candidates("auto", Precision.BF16, ["torch", "onnxruntime"], is_file=False)
    assert forced == [Candidate("torch", Precision.BF16)]  # --precision bf16 is bfloat16 alone
    runner = open_runner(tiny_model(1), "torch", threads=1, batch_size=8)
    bf16 = [t for t in runner.choice.trials if t.label == "torch bf16"]
    assert bf16 and bf16[0].images_per_second > 0
    assert "torch bf16+fp32" in {t.label for t in runner.choice.trials}
    assert "bfloat16 not considered" not in runner.choice.reason


class _Wrong(Runner):
    """The real model's answers, but a wrong top-1 on the first `wrong` images it sees."""

    def __init__(self, real: TorchRunner, wrong: int):
        self.real, self.wrong, self.seen = real, wrong, 0
        self.backend, self.precision, self.info, self.source = Backend.ONNXRUNTIME, Precision.FP32, real.info, "fake"

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.real.logits(images).clone()
        for row in range(len(images)):
            if self.seen < self.wrong:
                top = int(logits[row].argmax())
                logits[row, (top + 1) % self.num_classes] = logits[row, top] + 1
            self.seen += 1
        return logits


@pytest.mark.parametrize("wrong, accepted", [(1, True), (2, False)])
def test_a_candidate_that_disagrees_on_more_than_half_a_percent_is_rejected(measuring, monkeypatch, wrong,
                                                                          accepted):
    real_open = autotune._ModelTuner._open

    def fake_open(self, c: Candidate) -> Runner:
        return _Wrong(TorchRunner(self.net), wrong) if c.backend == "onnxruntime" else real_open(self, c)

    def fake_time(self, runners, x):  # the fake is the fastest: it is checked first
        return {c: 1000.0 if c.backend == "onnxruntime" else 10.0 for c in runners}

    monkeypatch.setattr(autotune._ModelTuner, "_open", fake_open)
    monkeypatch.setattr(autotune._Tuner, "_time", fake_time)
    runner = open_runner(tiny_model(10 + wrong), threads=1, batch_size=8)
    trials = {t.label: t for t in runner.choice.trials}
    fake = trials["onnxruntime fp32"]
    assert fake.agreement == pytest.approx(1 - wrong / autotune.CHECK_IMAGES)  # 1 of 200: exactly 99.5%
    if accepted:
        assert fake.verdict == "chosen" and runner.backend is Backend.ONNXRUNTIME
        assert trials["torch fp32"].verdict == "slower than the choice (not checked)"
    else:
        assert fake.verdict.startswith("rejected: agrees with float32 PyTorch on 99.0%")
        assert runner.backend is Backend.TORCH and trials["torch fp32"].verdict == "chosen"
        assert "onnxruntime fp32 rejected" in runner.choice.reason


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 8, 16, 64])
def test_the_core_budget_never_exceeds_the_cores(cores):
    budgets = [split_cores(cores=cores), split_cores(cores=cores, decoding=False)]
    budgets += [split_cores(cores=cores, infer_share=share) for share in (0.0, 0.1, 0.5, 0.9, 1.0)]
    budgets += [split_cores(cores=cores, threads=t) for t in range(1, cores + 1)]
    budgets += [split_cores(cores=cores, workers=w) for w in range(0, cores)]
    for b in budgets:
        assert b.threads >= 1 and b.workers >= 0 and b.workers + b.threads <= cores, b
        assert not b.oversubscribed
    if cores >= 2:  # decoding gets workers, and the model a thread
        assert split_cores(cores=cores).workers >= 1


def test_predict_keeps_workers_and_threads_within_the_cores(monkeypatch, tmp_path):
    from visionzoo.data import loader
    from visionzoo.tasks import predict as predict_module

    from .photos import write_augmented

    files = write_augmented(tmp_path / "photos", copies=2, originals=False)[:6]
    seen = {}
    real_batches = predict_module.image_batches

    def spy(*args, **kwargs):
        seen["workers"], seen["torch threads"] = kwargs["num_workers"], torch.get_num_threads()
        return real_batches(*args, **kwargs)

    monkeypatch.setattr(predict_module, "image_batches", spy)
    results = visionzoo.predict(files, tiny_model(), topk=1, batch_size=2)
    assert len(results) == len(files)
    assert 1 <= seen["torch threads"] and seen["workers"] + seen["torch threads"] <= loader.available_cpus()


class _Scripted(Runner):
    """Fixed logits for the rows of a batch of row indices (images[:, 0, 0, 0] holds each row's index)."""

    def __init__(self, table: torch.Tensor, info, precision: Precision):
        self.table, self.info, self.precision = table, info, precision
        self.backend, self.source, self.calls = Backend.TORCH, "scripted", []

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(images))
        return self.table[images[:, 0, 0, 0].long()].clone()

    def __call__(self, images):
        return self.logits(images), torch.zeros(len(images), 4)


def test_recheck_runs_near_ties_again_in_float32_and_keeps_clear_answers():
    """bfloat16's logits where the top two classes are clearly apart; float32's where they are within
    NEAR_TIE (the top-1 then float32's even where bfloat16 flipped it), in chunks of a fixed size."""
    info = TorchRunner(tiny_model()).info
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(11, 10, generator=g)
    exact[torch.arange(11), exact.argmax(1)] += 5  # every answer clear...
    fast = exact + 0.01 * torch.randn(11, 10, generator=g)
    near = [1, 4, 5, 7, 8, 10]  # ...but these, near ties in the fast output (a chunk of 4 and a padded one)
    for row in near:
        top = int(fast[row].argmax())
        runner_up = int(fast[row].topk(2).indices[1])
        fast[row, runner_up] = fast[row, top] - 0.01  # within 0.05 in probability
        exact[row] = fast[row]
        exact[row, runner_up] = fast[row, top] + 0.01  # and float32 ranks them the other way
    runner = backends.RecheckRunner(_Scripted(fast, info, Precision.BF16), _Scripted(exact, info, Precision.FP32))
    images = torch.arange(11.0)[:, None, None, None].expand(11, 3, 2, 2)
    logits = runner.logits(images)
    assert torch.equal(logits.argmax(1), exact.argmax(1))
    assert not torch.equal(fast.argmax(1), exact.argmax(1))  # the test means something: bfloat16 alone differs
    clear = [r for r in range(11) if r not in near]
    assert torch.equal(logits[clear], fast[clear]) and torch.equal(logits[near], exact[near])
    assert runner.exact.calls == [4, 4] and (runner.rows_seen, runner.rows_rechecked) == (11, 6)
    outputs = runner(images)  # the whole output: logits rechecked, the rest the fast runner's
    assert torch.equal(outputs[0], logits) and outputs[1].shape == (11, 4)
    assert runner.precision is Precision.BF16 and "near ties again in fp32" in runner.describe()
    assert runner.torch_net is None  # (scripted runners hold no PyTorch model)
    exact = TorchRunner(tiny_model())
    # Grad-CAM (serve's explanations) takes the float32 PyTorch model of a torch recheck
    assert backends.RecheckRunner(autotune._with_precision(exact, Precision.BF16), exact).torch_net is exact.net


def test_a_recheck_choice_is_cached_and_reopened_as_one():
    choice = autotune.Choice("torch", Precision.BF16, "why", measured=True, recheck=True)
    again = autotune.Choice.from_dict(choice.to_dict())
    assert again == choice and again.label == "torch bf16+fp32" and again.candidate.recheck
    assert autotune.Choice.from_dict({**choice.to_dict(), "recheck": None}).label == "torch bf16"  # older files
