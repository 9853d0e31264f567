"""Conformance matrix (as PEFT's tests/testing_common.py): every cell of method × base format × dtype runs through
the same operations; a new method or format adds cases in ``tests/conformance_cases.py``, never copies of tests.

Operations (one test function each, parametrized over ``CASES``):

1. ``identity``      wrapped output at init equals the base output (bit for bit; QuantFull re-quantizes: tolerance)
2. ``train_step``    one step changes exactly the trainable tensors; the quantized base is bit-for-bit unchanged;
                     ``requires_grad`` follows the config (also after ``set_adapter``)
3. ``save_load``     save → load in a FRESH process (one subprocess for all cells) gives identical outputs
4. ``merge``         ``merge_and_unload()`` against a float64 dequantize-then-matmul reference; the reported
                     re-quantization error agrees with the measured one
5. ``merge_cycles``  5 × (merge_adapter, unmerge_adapter) restores every tensor bit for bit
6. ``adapters``      disable_adapter gives the base output; a second adapter, set_adapter, delete_adapter
7. ``model_card``    README.md states the base format label, layer count and parameter count of the model
8. ``bad_file``      a corrupted adapter file (missing key, wrong shape, cast dtype) is refused, with the fix, and
                     so is an intact file loaded onto a model whose layers have other widths

Supported cells (``python -m tests.conformance_cases --matrix`` prints every cell; "refused" cells must raise an
error whose message contains "Fix"):

| method           | float Linear | float Conv2d | int4/int8 Linear, Conv2d | bnb nf4/fp4/nf4-dq/int8 | GPTQ (fp32)  |
|------------------|--------------|--------------|--------------------------|-------------------------|--------------|
| QOFT             | all          | all          | all                      | all                     | no merge (*) |
| TimestepScale    | all          | all          | all                      | all                     | no merge (*) |
| QuantFull        | (**)         | refused      | Linear (**), Conv2d: ref.| (**)                    | no cell      |
| StashQuant alone | all          | all          | refused                  | refused                 | no cell      |
| method + stash   | as method    | no cell      | int4 as method           | nf4 as method           | no cell      |

(*) merge and merge/unmerge cycles are refused. (**) disable_adapter and a second adapter are refused (QuantFull
releases the base weights and holds one adapter per layer). "refused": every operation must raise naming the fix.
dtypes: fp32 and bf16 everywhere, fp16 on float/int Linear; stash compositions fp32 and bf16.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conformance_cases import (
    CASES,
    Case,
    adapted_weight,
    apply_weight,
    build_base,
    dequantize_reference,
    inputs,
    make_config,
    manifest_entry,
    randomize,
    refusal,
    rel_fro,
    rel_rms,
    wrap,
)

ROOT = Path(__file__).resolve().parents[1]
case_params = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
REPORT_RTOL, REPORT_ATOL = 0.1, 1e-6  # reported vs measured re-quantization error


@pytest.fixture
def gptq(request):
    """``gptq_dir`` for a GPTQ cell (builds the tiny GPTQ checkpoint only when such a cell runs)."""

    def get(case: Case):
        return request.getfixturevalue("tiny_gptq_dir") if case.fmt == "gptq" else None

    return get


def assert_refused(action, why: str) -> None:
    """``action()`` must raise an error naming the fix ("Fix" in its message)."""
    try:
        action()
    except AssertionError:
        raise
    except Exception as error:  # noqa: BLE001  (any error type, as long as it names the fix)
        assert "Fix" in str(error), f"refused ({why}) without naming the fix: {type(error).__name__}: {error}"
        return
    raise AssertionError(f"expected a refusal ({why}), but the operation succeeded")


def check_wrap_refusal(case: Case, gptq) -> bool:
    """For cells whose wrap itself is refused: assert the refusal and return True."""
    why = refusal(case, "wrap")
    if why is None:
        return False
    assert_refused(lambda: wrap(case, gptq(case)), why)
    return True


def forward(model, case: Case, routing: str = "mixed") -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(case, routing))


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every tensor of the model (parameters, buffers, and quantization state such as bitsandbytes' absmax/SCB), tensor
    subclasses (torchao's quantized weights) as the plain tensors inside them."""
    tensors = {f"param:{n}": p for n, p in model.named_parameters()}
    tensors.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    tensors.update({f"state:{n}": t for n, t in model.state_dict().items() if isinstance(t, torch.Tensor)})
    return {n: t.detach().clone() for name, tensor in tensors.items() for n, t in _plain(name, tensor)}


def _plain(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        inner, meta = tensor.__tensor_flatten__()
        return [(f"{name}<{type(tensor).__name__} {meta}>", torch.tensor(0))] + [
            pair for part in inner for pair in _plain(f"{name}.{part}", getattr(tensor, part))]
    return [(name, tensor)]


# ---- 1. identity at init -------------------------------------------------------------------------------------------


@case_params
def test_identity(case, gptq):
    if check_wrap_refusal(case, gptq):
        return
    expected = forward(build_base(case, gptq(case)), case)
    model = wrap(case, gptq(case))
    out = forward(model, case)
    assert out.dtype == expected.dtype
    if case.method == "quant_full":  # the base weight is re-quantized to int8 (+1% float outliers)
        error = rel_rms(out, expected)
        assert error < 1e-2 + case.tol, f"QuantFull at init is {error:.3g} (relative RMS) away from its base"
    else:
        diff = (out.double() - expected.double()).abs().max().item()
        assert torch.equal(out, expected), f"not bit-for-bit the base output at init (max |diff| {diff:.3g})"


# ---- 2. one training step ------------------------------------------------------------------------------------------


def trainable_rule(case: Case):
    """``(requires_grad(name), changes(name))`` for the cell's train-step config."""
    targets = tuple(f"model.{t}." for t in case.targets)
    if case.method == "qoft":  # bias="qoft_only": the targeted layers' biases train too
        def trains(n):
            return "qoft_Q.default" in n or (n.endswith("base_layer.bias") and any(t in n for t in targets))
        return trains, trains
    if case.method == "timestep_scale":
        def trains(n):
            return "ts_scale_in.default" in n or "ts_scale_out.default" in n
        return trains, trains
    if case.method == "quant_full":  # train_bias=False; the int8 codes and float outliers train, scales are fixed
        def changes(n):
            return "qf_codes.default" in n or "qf_outlier_value.default" in n
        return (lambda n: "qf_anchor.default" in n), changes

    def trains(n):
        return "stash_module.default." in n
    return trains, trains


def _train_overrides(case: Case) -> dict:
    return {"qoft": dict(bias="qoft_only"), "quant_full": dict(train_bias=False)}.get(case.method, {})


def _requires_grad_problems(model, trains, when: str) -> list[str]:
    return [f"{when}: {n}.requires_grad={p.requires_grad}, expected {trains(n)}"
            for n, p in model.named_parameters() if p.requires_grad != trains(n)]


@case_params
def test_train_step(case, gptq):
    if check_wrap_refusal(case, gptq):
        return
    import peft_quant

    model = wrap(case, gptq(case), **_train_overrides(case))
    trains, changes = trainable_rule(case)
    problems = _requires_grad_problems(model, trains, "after wrap")
    model.set_adapter("default")
    problems += _requires_grad_problems(model, trains, "after set_adapter")
    if case.method == "quant_full":
        optimizer = peft_quant.QuantFullOptimizer(model, lr=1e-2)
    else:
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = snapshot(model)
    sample, t = inputs(case, routing="expert0")  # TimestepScale: only expert 0 may train
    model(sample, t).float().pow(2).mean().backward()
    optimizer.step()
    after = snapshot(model)
    assert set(after) == set(before), f"tensors appeared/disappeared: {sorted(set(after) ^ set(before))[:6]}"
    for name, old in before.items():
        new = after[name]
        changed = old.shape != new.shape or old.dtype != new.dtype or not torch.equal(old, new)
        should = changes(name.split(":", 1)[1])
        if changed != should:
            problems.append(f"{name} {'changed' if changed else 'did not change'}")
        elif should and "ts_scale_" in name and not torch.equal(old[1], new[1]):
            problems.append(f"{name}: expert 1 changed though every timestep was in expert 0")
    if case.stash:
        packer = peft_quant.stash_packer(model)
        if packer is None or packer.packed_tensors == 0:
            problems.append("stash={...}: no packer attached, or nothing was packed during the forward")
    assert not problems, f"{len(problems)} problem(s): " + "; ".join(problems[:8])


# ---- 3. save -> load in a fresh process ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def saved(request, tmp_path_factory):
    """Every selected supported cell, randomized and saved; reloaded and run in ONE fresh process.

    ``{case id: {"dir", "expected", "loaded" or "error", "num_params", "labels"}}``.
    """
    selected = {item.callspec.params["case"].id for item in request.session.items
                if isinstance(getattr(item, "callspec", None) and item.callspec.params.get("case"), Case)
                and item.originalname in ("test_save_load", "test_model_card", "test_bad_file")}
    root = tmp_path_factory.mktemp("conformance_saved")
    gptq_dir, results, entries = None, {}, []
    for case in CASES:
        if case.id not in selected or refusal(case, "wrap") is not None:
            continue
        if case.fmt == "gptq" and gptq_dir is None:
            try:
                gptq_dir = request.getfixturevalue("tiny_gptq_dir")
            except pytest.skip.Exception:  # no gptqmodel: the GPTQ cells skip in their own tests
                continue
        result = results[case.id] = {"dir": str(root / case.id)}
        try:
            model = wrap(case, gptq_dir if case.fmt == "gptq" else None)
            randomize(model)
            result["expected"] = forward(model, case)
            if case.method == "quant_full":
                state = {n: t for n, t in model.state_dict().items() if ".qf_" in n}
                result["num_params"] = sum(t.numel() for t in state.values())
            else:
                result["num_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result["labels"] = sorted({m.base_format.label for m in model.modules() if hasattr(m, "base_format")})
            model.save_pretrained(result["dir"])
            entries.append(manifest_entry(case, result["dir"]))
        except Exception as error:  # noqa: BLE001  (reported by the cell's own test)
            result["error"] = f"in-process wrap/save failed: {type(error).__name__}: {error}"
    if entries:
        manifest = {"cases": entries, "gptq_dir": gptq_dir, "outputs": str(root / "outputs.safetensors"),
                    "errors": str(root / "errors.json")}
        (root / "manifest.json").write_text(json.dumps(manifest))
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "tests.conformance_cases", str(root / "manifest.json")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
        if done.returncode:
            raise RuntimeError(f"the fresh-process load step failed:\n{done.stderr[-3000:]}")
        outputs = load_file(manifest["outputs"])
        errors = json.loads(Path(manifest["errors"]).read_text())
        for case_id, result in results.items():
            if case_id in outputs:
                result["loaded"] = outputs[case_id]
            elif "error" not in result:
                result["error"] = "fresh process: " + errors.get(case_id, "no output")
    return results


@case_params
def test_save_load(case, gptq, saved):
    if check_wrap_refusal(case, gptq):
        return
    gptq(case)  # GPTQ cells skip here without gptqmodel
    result = saved[case.id]
    assert "error" not in result, result.get("error")
    loaded, expected = result["loaded"], result["expected"]
    assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
    diff = (loaded.double() - expected.double()).abs().max().item()
    assert torch.equal(loaded, expected), f"fresh-process output differs (max |diff| {diff:.3g})"


# ---- 4. merge against an independent reference ---------------------------------------------------------------------


def _capture(model, names):
    """Forward hooks recording each named layer's input and output."""
    seen, handles = {}, []
    for name in names:
        layer = model.base_model.model.get_submodule(name)
        handles.append(layer.register_forward_hook(
            lambda module, args, out, name=name: seen.__setitem__(name, (args[0].detach(), out.detach()))))
    return seen, handles


@case_params
def test_merge(case, gptq):
    if check_wrap_refusal(case, gptq):
        return
    model = wrap(case, gptq(case), experts=1)
    randomize(model)
    why = refusal(case, "merge")
    if why is not None:
        assert_refused(model.merge_and_unload, why)
        return
    seen, handles = _capture(model, case.targets)
    unmerged = forward(model, case)
    for handle in handles:
        handle.remove()
    problems, targets = [], {}
    for name in case.targets:
        layer = model.base_model.model.get_submodule(name)
        base_weight = None if case.method == "quant_full" else dequantize_reference(layer.get_base_layer())
        weight, bias = adapted_weight(case, layer, base_weight)
        x, out = seen[name]
        if case.method == "timestep_scale":  # s_out ⊙ W(s_in ⊙ x) + b: the bias is not scaled
            s_in = layer.ts_scale_in["default"].detach()[0].double()
            s_out = layer.ts_scale_out["default"].detach()[0].double()
            x_scaled = x.double() * (s_in.view(-1, 1, 1) if case.arch == "conv" else s_in)
            reference = apply_weight(case, name, x_scaled, base_weight, bias, s_out)
        else:
            reference = apply_weight(case, name, x, weight, bias)
        error = rel_rms(out, reference)
        if error > case.tol + (1e-2 if case.method == "quant_full" else 0.0):
            problems.append(f"{name}: the unmerged output is {error:.3g} from the float64 reference")
        targets[name] = (x, weight, reference)
    merged = model.merge_and_unload()
    report = getattr(merged, "peft_quant_merge_report", None)
    assert isinstance(report, dict), "merge_and_unload() returned no peft_quant_merge_report"
    if set(report) != set(case.targets):
        problems.append(f"report covers {sorted(report)}, expected {list(case.targets)}")
    measured = {}
    for name, (x, weight, reference) in targets.items():
        new = merged.get_submodule(name)
        try:
            new_weight = dequantize_reference(new, case.torch_dtype)  # as the merged layer's forward uses it
        except TypeError as error:
            problems.append(f"{name}: merged layer is {type(new).__name__}: {error}")
            continue
        measured[name] = rel_fro(new_weight, weight)
        entry = report.get(name, {})
        if entry.get("base") != case.label:
            problems.append(f"{name}: report base {entry.get('base')!r}, expected {case.label!r}")
        reported = entry.get("relative_error")
        if reported is None or abs(reported - measured[name]) > REPORT_RTOL * measured[name] + REPORT_ATOL:
            problems.append(f"{name}: reported relative error {reported!r}, measured {measured[name]:.4g}")
        with torch.no_grad():
            layer_out = new(x)
        if layer_out.dtype != x.dtype:
            problems.append(f"{name}: merged layer returns {layer_out.dtype} for {x.dtype} input")
        error = rel_rms(layer_out, reference)
        if error > 3 * measured[name] + case.tol:
            problems.append(f"{name}: merged layer output is {error:.3g} from the reference "
                            f"(weight error {measured[name]:.3g})")
    try:
        merged_out = forward(merged, case)
        error = rel_rms(merged_out, unmerged)
        if error > 3 * max(measured.values(), default=0.0) + 2 * case.tol:
            problems.append(f"merged model output is {error:.3g} from the unmerged one")
    except Exception as error:  # noqa: BLE001
        problems.append(f"merged model forward failed: {type(error).__name__}: {error}")
    assert not problems, f"{len(problems)} problem(s): " + "; ".join(problems[:8])


# ---- 5. merge/unmerge cycles ---------------------------------------------------------------------------------------


@case_params
def test_merge_cycles(case, gptq):
    if check_wrap_refusal(case, gptq):
        return
    model = wrap(case, gptq(case), experts=1)
    randomize(model)
    why = refusal(case, "merge_cycles")
    if why is not None:
        def cycles():
            for _ in range(5):
                model.merge_adapter()
                model.unmerge_adapter()
        assert_refused(cycles, why)
        return
    before = snapshot(model)
    expected = forward(model, case)
    for _ in range(5):
        model.merge_adapter()
        model.unmerge_adapter()
    after = snapshot(model)
    assert set(after) == set(before), f"tensors appeared/disappeared: {sorted(set(after) ^ set(before))[:6]}"
    drifted = [n for n, t in before.items() if t.dtype != after[n].dtype or not torch.equal(t, after[n])]
    assert not drifted, f"{len(drifted)} tensors not restored bit for bit after 5 cycles: {drifted[:6]}"
    out = forward(model, case)
    assert torch.equal(out, expected), f"output drifted by {(out.double() - expected.double()).abs().max():.3g}"


# ---- 6. disable / second adapter / set / delete --------------------------------------------------------------------


@case_params
def test_adapters(case, gptq):
    if check_wrap_refusal(case, gptq):
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    base_out = forward(build_base(case, gptq(case)), case)
    model = wrap(case, gptq(case))
    randomize(model)
    own = forward(model, case)
    why = refusal(case, "adapters")
    if why is not None:
        def disabled():
            with model.disable_adapter():
                forward(model, case)
        assert_refused(disabled, why)
        assert_refused(lambda: model.add_adapter("other", make_config(case)), why)
        return
    with model.disable_adapter():
        disabled = forward(model, case)
    assert torch.equal(disabled, base_out), "disable_adapter() does not give the base output bit for bit"
    model.add_adapter("other", make_config(case))
    randomize(model, "other", seed=1)
    model.set_adapter("other")
    assert all(p.requires_grad == (".other." in n + ".") for n, p in model.named_parameters() if p.requires_grad) \
        and any(p.requires_grad for p in model.parameters()), "after set_adapter('other') only 'other' trains"
    other = forward(model, case)
    assert not torch.equal(other, own), "set_adapter('other') changed nothing"
    model.set_adapter("default")
    assert torch.equal(forward(model, case), own), "set_adapter('default') does not restore the first adapter"
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    leftovers = [n for n in model.state_dict() if ".other." in n + "."]
    assert not leftovers, f"delete_adapter left tensors behind: {leftovers[:4]}"
    assert all(m.active_adapters == ["default"] for m in model.modules() if isinstance(m, BaseTunerLayer))
    assert torch.equal(forward(model, case), own), "deleting the second adapter changed the first's output"


# ---- 7. model card -------------------------------------------------------------------------------------------------


def _card_row(card: str, title: str) -> str:
    for line in card.splitlines():
        if line.startswith(f"| {title} |"):
            return line.split("|")[2].strip()
    raise AssertionError(f"the model card has no row {title!r}")


@case_params
def test_model_card(case, gptq, saved):
    if check_wrap_refusal(case, gptq):
        return
    gptq(case)  # GPTQ cells skip here without gptqmodel
    result = saved[case.id]
    assert "error" not in result, result.get("error")
    card_path = Path(result["dir"]) / "README.md"
    assert card_path.exists(), "save_pretrained wrote no README.md model card"
    card = card_path.read_text()
    file_params = sum(t.numel() for t in load_file(str(Path(result["dir"]) / "adapter_model.safetensors")).values())
    problems = []
    if _card_row(card, "Base layers the adapter sits on") != case.label:
        problems.append(f"base row {_card_row(card, 'Base layers the adapter sits on')!r}, expected {case.label!r}")
    if result["labels"] != [case.label]:
        problems.append(f"the layers describe their base as {result['labels']}, expected {case.label!r}")
    if _card_row(card, "Adapted layers") != str(len(case.targets)):
        problems.append(f"adapted layers {_card_row(card, 'Adapted layers')!r}, expected {len(case.targets)}")
    stated = _card_row(card, "Adapter parameters").split(" ")[0]
    for what, count in (("the model", result["num_params"]), ("the adapter file", file_params)):
        if stated != f"{count:,}":
            problems.append(f"card says {stated} parameters, {what} has {count:,}")
    assert not problems, "; ".join(problems)


# ---- 8. corrupted files are refused --------------------------------------------------------------------------------


def _corrupt(path: Path, kind: str) -> str:
    tensors = load_file(str(path))
    key = sorted(tensors)[0]
    if kind == "missing_key":
        del tensors[key]
    elif kind == "wrong_shape":
        t = tensors[key]
        tensors[key] = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1)
    else:
        t = tensors[key]
        tensors[key] = t.to(torch.float16 if t.dtype != torch.float16 else torch.float32)
    save_file(tensors, str(path))
    return key


@case_params
@pytest.mark.parametrize("kind", ["missing_key", "wrong_shape", "cast_dtype", "other_model"])
def test_bad_file(case, kind, gptq, saved, tmp_path):
    if check_wrap_refusal(case, gptq):
        return
    gptq(case)  # GPTQ cells skip here without gptqmodel
    from peft import PeftModel

    result = saved[case.id]
    assert "error" not in result, result.get("error")
    directory = tmp_path / "adapter"
    shutil.copytree(result["dir"], directory)
    if kind == "other_model":  # the file is intact; the model's layers have other widths
        assert_refused(lambda: PeftModel.from_pretrained(build_base(case, gptq(case), wide=True), str(directory)),
                       "an adapter loaded onto a model it does not fit")
        return
    key = _corrupt(directory / "adapter_model.safetensors", kind)
    assert_refused(lambda: PeftModel.from_pretrained(build_base(case, gptq(case)), str(directory)),
                   f"{kind} of {key}")
