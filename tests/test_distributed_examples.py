"""Every method's example under data parallelism: two CPU processes (gloo) started by ``torchrun`` and by ``accelerate
launch --config_file examples/accelerate_ddp.yaml``, tiny models, a few steps.

Asserted per example: every rank ends with the same adapter (the SHA-256 each rank reports of its adapter tensors,
checked against the adapter the first process saved); the two-process run agrees with one process trained on the whole
(same global) batch; and, for QOFT (own loop) and QuantFull (Trainer), a run resumed from its mid-run checkpoint under
DDP ends bit for bit where the uninterrupted run did.

Launches are few because each process spends most of its time importing torch and transformers: one ``torchrun`` of
this module runs every example script in turn (as ``python script.py`` runs it: ``runpy`` with ``__name__ ==
"__main__"``), one ``accelerate launch`` runs ``examples/qoft_minilm.py`` itself, and the one-process references run
the same scripts in the test process. ``python -m tests.test_distributed_examples RUNS.json`` is that runner.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # one torchrun launch of every example (~70 s on 2 CPU cores), one accelerate launch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
LAUNCH_TIMEOUT = 420  # seconds, for a launch running every example once or twice
# Two processes against one on the same global batch: DDP's averaged gradient differs from the whole batch's only in
# float32 summation order (~1e-7 relative). QuantFull's int8 codes move by sign and identically seeded rounding
# (measured: the adapter equals one process's bit for bit). Adam divides each element's step by that element's own
# gradient magnitude, which makes the noise larger in the parameters: measured after 2 steps 1.1e-5 (QOFT) and 2.3e-5
# (TimestepScale) relative; the tolerance is 4x that.
QUANT_FULL_RTOL = 1e-5
ADAM_RTOL = 1e-4

try:  # the tiny Stable Diffusion pipeline and instance images of the DreamBooth example's own test
    from .test_examples import RESOLUTION, instance_dir, tiny_sd_dir  # noqa: F401  (fixtures)

    HAS_DIFFUSERS = True
except pytest.skip.Exception:  # no diffusers: that example is not run
    HAS_DIFFUSERS = False

# ---- the runner: each example script in turn, in this process ------------------------------------------------------


def run_scripts(runs: list[dict]) -> None:
    """Run each ``{"script", "argv", "stdout"}`` of ``runs`` as ``python script *argv`` would, in this process; the
    first process's printed output goes to the file ``stdout`` names."""
    sys.path.insert(0, str(EXAMPLES))  # what Python does for a script: its folder first on sys.path
    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    torch.set_num_threads(1)  # one thread in every process, references included: the same float reductions
    try:
        for run in runs:
            sys.argv = [run["script"], *run["argv"]]
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                runpy.run_path(run["script"], run_name="__main__")
            if int(os.environ.get("RANK", "0")) == 0:
                Path(run["stdout"]).write_text(output.getvalue())
    finally:
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
        sys.path.remove(str(EXAMPLES))


def _env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore",
                TRANSFORMERS_VERBOSITY="error")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, command: list[str], work: Path) -> subprocess.CompletedProcess:
    """Two processes of ``command`` (a script and its arguments, or ``-m module ...``) started by ``launcher``:
    ``torchrun`` or ``accelerate`` (with ``examples/accelerate_ddp.yaml``). Fails the test if a rank fails."""
    port = str(_free_port())
    if launcher == "torchrun":
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(EXAMPLES / "accelerate_ddp.yaml"), "--main_process_port", port]
    try:
        result = subprocess.run(prefix + command, cwd=work, env=_env(), capture_output=True, text=True,
                                timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as timeout:  # a rank stuck (e.g. its peer died in a collective): show both
        stderr = timeout.stderr.decode(errors="replace") if isinstance(timeout.stderr, bytes) else timeout.stderr
        pytest.fail(f"{launcher} did not finish in {LAUNCH_TIMEOUT} s:\n{(stderr or '')[-6000:]}")
    assert result.returncode == 0, f"{launcher} failed:\n{result.stderr[-6000:]}"
    return result


# ---- what the examples left behind -----------------------------------------------------------------------------------


def summary(run: dict) -> dict:
    """The JSON summary the first process printed last (it starts on a line of its own)."""
    text = Path(run["stdout"]).read_text()
    return json.loads(text[0 if text.startswith("{\n") else text.rindex("\n{\n") + 1:])


def adapter(directory: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "adapter_model.safetensors"))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_ranks_identical(run: dict, directory: str | Path) -> None:
    """Both ranks reported the same adapter digest, and it is the digest of the adapter the first process saved."""
    from examples.data_parallel import state_digest

    report = summary(run)
    assert report["processes"] == 2 and report["ranks_identical"] is True, report
    digests = report["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert digests[0] == state_digest(adapter(directory)), "the digest is not that of the saved adapter"


def assert_adapters_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- the runs --------------------------------------------------------------------------------------------------------

STEPS = 4  # QuantFull, QOFT: checkpoint after 2, resume to 4
SEQ = 16
PER_RANK = 2  # rows (sentences, images) per process and step; one process gets 2 * PER_RANK


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama with a byte-level BPE saved beside it: the runs of a script share one tokenizer (training
    one is not reproducible across processes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.offline_text import stdlib_sentences, train_tokenizer

    path = tmp_path_factory.mktemp("llama")
    tokenizer = train_tokenizer(stdlib_sentences()[64:2000], vocab_size=300)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )).save_pretrained(path)
    return str(path)


def _runs(work: Path, llama: str, sd: tuple | None, processes: int) -> dict[str, dict]:
    """Each example's runs for ``processes`` processes sharing the global batch (``2 * PER_RANK``)."""
    from .distributed_trainer_worker import CPU_DDP_RESUME

    batch = str(2 * PER_RANK // processes)  # per process, where the script takes it so
    out = work / f"p{processes}"
    out.mkdir(parents=True)
    runs: dict[str, dict] = {}

    def add(name: str, script: str, *argv: str) -> None:
        runs[name] = {"script": str(EXAMPLES / script), "argv": [a.replace("{out}", str(out / name)) for a in argv],
                      "stdout": str(out / f"{name}.stdout"), "dir": str(out / name)}

    quant_full = ("quant_full_trainer.py", "--model_name_or_path", llama, "--max_steps", str(STEPS),
                  "--per_device_train_batch_size", batch, "--block_size", str(SEQ), "--output_dir", "{out}")
    add("quant_full", *quant_full, "--save_steps", "2")
    # one process: the two ranks' shares in turn (gradient accumulation), as the README's stash cases compare
    add("stash", "stash_trainer.py", "--model_name_or_path", llama, "--max_steps", "3",
        "--per_device_train_batch_size", str(PER_RANK), "--gradient_accumulation_steps", str(3 - processes),
        "--block_size", str(SEQ), "--stash_milestones", "0.5:6", "--output_dir", "{out}")
    qoft = ("qoft_minilm.py", "--batch-size", str(2 * PER_RANK), "--held-out", "4", "--no-fresh-process-check",
            "--out", "{out}")
    if processes == 1:  # the reference of the accelerate launch: dropout off, so one process can equal two
        add("qoft", *qoft, "--steps", "2", "--no-dropout")
    else:  # dropout on (the default): resuming must restore each rank's random state
        add("qoft", *qoft, "--steps", str(STEPS), "--save-steps", "2")
        add("qoft_resumed", *qoft, "--steps", str(STEPS), "--resume-from-checkpoint",
            str(out / "qoft" / "checkpoint-2"))
        if CPU_DDP_RESUME:
            add("quant_full_resumed", *quant_full, "--save_steps", "2", "--resume_from_checkpoint",
                str(out / "quant_full" / "checkpoint-2"))
    if sd is not None:
        add("dreambooth", "dreambooth_timestep_scale.py", "--pretrained_model_name_or_path", str(sd[0]),
            "--instance_data_dir", str(sd[1]), "--instance_prompt", "a photo of sks dog", "--output_dir", "{out}",
            "--resolution", str(RESOLUTION), "--train_batch_size", batch, "--max_train_steps", "2",
            "--learning_rate", "1e-2", "--num_experts", "2", "--gradient_checkpointing", "--device", "cpu")
    return runs


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, llama_dir) -> dict[str, dict[str, dict]]:
    """``{"one": runs, "torchrun": runs}``: one process on the whole batch (in this process), and two processes
    started by torchrun running this module's runner."""
    sd = (request.getfixturevalue("tiny_sd_dir"), request.getfixturevalue("instance_dir")) if HAS_DIFFUSERS else None
    work = tmp_path_factory.mktemp("examples")
    one, two = _runs(work, llama_dir, sd, 1), _runs(work, llama_dir, sd, 2)
    spec = work / "runs.json"
    spec.write_text(json.dumps(list(two.values())))
    launch("torchrun", ["-m", "tests.test_distributed_examples", str(spec)], work)
    run_scripts(list(one.values()))
    return {"one": one, "torchrun": two}


# ---- the tests -------------------------------------------------------------------------------------------------------


def test_quant_full_trainer_ranks_identical_agree_with_one_process_and_resume_exactly(runs):
    from .distributed_trainer_worker import CPU_DDP_RESUME

    one, two = runs["one"]["quant_full"], runs["torchrun"]["quant_full"]
    assert_ranks_identical(two, two["dir"])
    ddp, single = adapter(two["dir"]), adapter(one["dir"])
    codes = [k for k in ddp if k.endswith("qf_codes")]
    assert len(codes) == 15
    differ = sum(int((ddp[k] != single[k]).sum()) for k in codes)
    total = sum(ddp[k].numel() for k in codes)
    assert differ <= 1e-4 * total, f"{differ} of {total} int8 codes differ from one process"
    for key in ddp:
        if ddp[key].is_floating_point():
            assert relative(ddp[key], single[key]) < QUANT_FULL_RTOL, key
    assert summary(two)["loss"]["last"] == pytest.approx(summary(one)["loss"]["last"], rel=QUANT_FULL_RTOL)
    if CPU_DDP_RESUME:
        resumed = runs["torchrun"]["quant_full_resumed"]
        assert_ranks_identical(resumed, resumed["dir"])
        # really resumed: a run from step 0 would have written checkpoint-2 too
        assert sorted(p.name for p in Path(resumed["dir"]).glob("checkpoint-*")) == ["checkpoint-4"]
        assert_adapters_equal(adapter(resumed["dir"]), ddp)
        assert summary(resumed)["loss"]["last"] == summary(two)["loss"]["last"]


def test_stash_trainer_ranks_identical_and_equal_one_process_on_the_same_shares(runs):
    """Each rank packs its own share's activations (4 bits, then 6). One process running the two shares in turn
    (gradient accumulation) packs exactly the same blocks, so the LoRA adapters are equal bit for bit. (Against the
    whole batch at once, float32 noise flips a few 4-bit codes and AdamW's sign-like first steps amplify it.)"""
    one, two = runs["one"]["stash"], runs["torchrun"]["stash"]
    assert_ranks_identical(two, two["dir"])
    report = summary(two)
    assert report["sequences_per_step"] == summary(one)["sequences_per_step"] == 2 * PER_RANK
    assert report["stash"]["bits_from_step"] == {"1": 4, "3": 6}
    assert report["held_for_backward_per_step"]["first_step"]["packed_tensors"] > 10
    ddp = adapter(two["dir"])
    assert len(ddp) == 2 * 7 * 2  # lora_A and lora_B of the seven Linears of both decoder layers
    assert_adapters_equal(ddp, adapter(one["dir"]))


def test_qoft_minilm_ranks_identical_and_resume_exactly(runs):
    full, resumed = runs["torchrun"]["qoft"], runs["torchrun"]["qoft_resumed"]
    assert_ranks_identical(full, full["dir"])
    assert_ranks_identical(resumed, resumed["dir"])
    assert (Path(full["dir"]) / "checkpoint-2" / "rng_state_1.pt").is_file()
    assert summary(resumed)["resumed_from_step"] == 2 and "step    1 " not in Path(resumed["stdout"]).read_text()
    # dropout on (the default): the resumed run drew the same dropout masks from the restored random state
    assert_adapters_equal(adapter(resumed["dir"]), adapter(full["dir"]))
    trained = adapter(full["dir"])
    assert all(t.abs().max() > 0 for t in trained.values())  # trained away from the identity


def test_qoft_minilm_under_accelerate_launch_ranks_identical_and_agree_with_one_process(runs, tmp_path):
    """``accelerate launch --config_file examples/accelerate_ddp.yaml examples/qoft_minilm.py``: the script's own
    loop joins the process group accelerate describes, each rank trains its half of each batch of 4 sentences."""
    one = runs["one"]["qoft"]
    out = tmp_path / "accelerate"
    result = launch("accelerate", [one["script"], *[a.replace(one["dir"], str(out)) for a in one["argv"]]], tmp_path)
    stdout = tmp_path / "accelerate.stdout"
    stdout.write_text(result.stdout)  # the first process prints; the others print nothing
    assert_ranks_identical({"stdout": str(stdout)}, out)
    two, single = adapter(out), adapter(one["dir"])
    assert sorted(two) == sorted(single) and len(single) == 6 * 6  # q, k, v and three dense of six layers
    for key in single:
        assert single[key].abs().max() > 0, key  # trained away from the identity
        assert relative(two[key], single[key]) < ADAM_RTOL, key


@pytest.mark.diffusers
@pytest.mark.skipif(not HAS_DIFFUSERS, reason="needs the [diffusers] extra")
def test_dreambooth_timestep_scale_ranks_identical_and_agree_with_one_process(runs):
    one, two = runs["one"]["dreambooth"], runs["torchrun"]["dreambooth"]
    assert_ranks_identical(two, two["dir"])
    assert summary(two)["images_per_step"] == summary(one)["images_per_step"] == 2 * PER_RANK
    ddp, single = adapter(two["dir"]), adapter(one["dir"])
    assert sorted(ddp) == sorted(single) and len(ddp) > 20
    for key in ddp:
        assert relative(ddp[key], single[key]) < ADAM_RTOL, key
    assert summary(two)["final_loss"] == pytest.approx(summary(one)["final_loss"], rel=1e-5)


if __name__ == "__main__":
    run_scripts(json.loads(Path(sys.argv[1]).read_text()))
