"""The one safe weights reader and tensor validator that trunks, checkpoints and bundles share."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load, save, save_file

from stadapter import weights
from stadapter.weights import BUNDLE_DTYPES, WeightsError, check_finite, check_tensors, read_weights


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_read_weights_reads_both_formats_and_never_unpickles_objects(tmp_path, capsys):
    t = {"w": torch.ones(2, 3)}
    save_file(t, str(tmp_path / "a.safetensors"))
    torch.save({"model": t}, tmp_path / "b.pth")
    assert torch.equal(read_weights(tmp_path / "a.safetensors")["w"], t["w"])
    assert torch.equal(read_weights(tmp_path / "b.pth")["model"]["w"], t["w"])
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(WeightsError, match="UnpicklingError"):
        read_weights(tmp_path / "evil.pth")
    assert "unpickled!" not in capsys.readouterr().out
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError):
        read_weights(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("tensors,kwargs,message", [
    ({"a": torch.zeros(2)}, {"shapes": {"a": (2,), "b": (1,)}}, r"missing \['b'\], unexpected \[\]"),
    ({"a": torch.zeros(3)}, {"shapes": {"a": (2,)}}, r"'a' has shape \(3,\), expected \(2,\) \(1 mismatched\)"),
    ({"a": torch.zeros(2, dtype=torch.int64)}, {"dtypes": BUNDLE_DTYPES}, "dtype torch.int64; allowed: float32"),
    ({"a": torch.tensor([1.0, float("inf")])}, {}, "'a' holds NaN or Inf"),
])
def test_check_tensors_names_what_is_wrong(tensors, kwargs, message):
    with pytest.raises(WeightsError, match=message):
        check_tensors(tensors, **kwargs)


def test_check_tensors_accepts_what_fits():
    check_tensors({"a": torch.zeros(2, 3)}, {"a": (2, 3)}, BUNDLE_DTYPES)
    check_tensors({"a": torch.tensor([float("nan")])}, finite=False)


def _extremes(dtype: torch.dtype) -> torch.Tensor:
    """Finite values at the edges: the largest and smallest normal, a subnormal, both zeros."""
    info = torch.finfo(dtype)
    return torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, 0.0, -0.0, 1.0]).to(dtype)


@pytest.mark.parametrize("dtype", BUNDLE_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 1, 2])
@pytest.mark.parametrize("chunk", [None, 4])  # one pass, or many (a large bundle's)
def test_check_finite_over_a_whole_file_finds_nan_and_inf_in_any_tensor_and_names_it(dtype, bad, where, chunk,
                                                                                      monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(weights, "_FINITE_CHUNK", chunk)
    tensors = {f"t{i}": _extremes(dtype).repeat(i + 1) for i in range(3)}
    check_finite(data := save(tensors), load(data))  # finite at every edge of the dtype: accepted
    tensors[f"t{where}"][-1] = bad
    data = save(tensors)
    with pytest.raises(WeightsError, match=f"'t{where}' holds NaN or Inf"):
        check_finite(data, load(data))


def test_check_finite_checks_each_tensor_of_a_file_of_mixed_dtypes():
    tensors = {"a": torch.ones(3), "b": torch.ones(5, dtype=torch.float16), "c": torch.ones(2, dtype=torch.bfloat16)}
    check_finite(data := save(tensors), load(data))
    tensors["b"][4] = float("nan")
    data = save(tensors)
    with pytest.raises(WeightsError, match="'b' holds NaN or Inf"):
        check_finite(data, load(data))
    check_finite(data := save({"a": torch.zeros(0)}), load(data))  # no bytes to check
