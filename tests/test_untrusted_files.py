"""Every validation branch of the readers of untrusted files (issue 18): safetensors
headers, PyTorch zip pickles, weights indexes, and chat templates that try to leave
the Jinja sandbox. Each bad file is refused with a CheckpointError (or TokenizerError)
naming the file, never read past, never executed."""
from __future__ import annotations

import collections
import io
import json
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR
from dsflow.common.errors import CheckpointError
from dsflow.export.checkpoint.safetensors import MAX_HEADER, SafetensorsFile
from dsflow.export.checkpoint.torch_bin import TorchBinFile


# --- safetensors ---------------------------------------------------------------------

def _safetensors(path: Path, header: bytes, data: bytes = b"", length: int | None = None):
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def _entry(**over) -> bytes:
    e = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **over}
    return json.dumps({"w": e}).encode()


@pytest.mark.parametrize("header,length,data,needle", [
    (b"{}", 2**40, b"", "header length 1099511627776 exceeds the file"),
    (b"{}" + b" " * 64, MAX_HEADER + 1, b"", f"header length {MAX_HEADER + 1} exceeds"),
    (b"{\"w\": ", None, b"", "header is not valid JSON"),
    (b"\xff\xfe{}", None, b"", "header is not valid JSON"),
    (b"[1, 2]", None, b"", "header is not a JSON object"),
    (b"\"text\"", None, b"", "header is not a JSON object"),
    (_entry(data_offsets=[-8, 0]), None, b"\0" * 8, "negative offset or dimension"),
    (_entry(shape=[-2], data_offsets=[0, 8]), None, b"\0" * 8,
     "negative offset or dimension"),
    (_entry(data_offsets=[0]), None, b"\0" * 8, "needs 'shape' and two 'data_offsets'"),
    (_entry(dtype="F99"), None, b"\0" * 8, "unsupported or missing dtype"),
    (_entry(data_offsets=[0, 16], shape=[4]), None, b"\0" * 8, "w"),  # past the end
])
def test_safetensors_header_validation(tmp_path, header, length, data, needle):
    path = _safetensors(tmp_path / "m.safetensors", header, data, length)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)


def test_safetensors_truncated_below_the_length_field(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        SafetensorsFile(path)


def test_safetensors_valid_control(tmp_path):
    """The same builder with a good header opens: the refusals are about the header."""
    path = _safetensors(tmp_path / "m.safetensors", _entry(), struct.pack("<2f", 1.5, -2.0))
    with SafetensorsFile(path) as f:
        assert f.array("w").tolist() == [1.5, -2.0]


# --- PyTorch zip (torch.save layout, data.pkl written by hand) -------------------------

class _Storage:
    """Pickled as the persistent id `pid` (what torch.save writes for a storage)."""

    def __init__(self, pid):
        self.pid = pid


class _Tensor:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset=0, size=(2,), stride=(1,)):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        import torch._utils
        return (torch._utils._rebuild_tensor_v2,
                (*self.args, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def _float_storage(numel=2, key="0"):
    import torch
    return _Storage(("storage", torch.FloatStorage, key, "cpu", numel))


def _torch_zip(path: Path, obj, storages: dict[str, bytes] | None = None) -> Path:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in (storages if storages is not None else {"0": b"\0" * 8}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def test_torch_zip_builder_control(tmp_path):
    path = _torch_zip(tmp_path / "ok.bin", {"w": _Tensor(_float_storage())},
                      {"0": struct.pack("<2f", 3.0, 4.0)})
    with TorchBinFile(path) as f:
        assert f.names() == ["w"] and f.array("w").tolist() == [3.0, 4.0]


@pytest.mark.parametrize("obj,needle", [
    # persistent ids that are not a 5-tuple ('storage', <Storage type>, key, location, numel)
    ({"w": _Tensor(_Storage("storage"))}, "unexpected persistent id"),
    ({"w": _Tensor(_Storage(("storage", "FloatStorage", "0", "cpu", 2)))},
     "unexpected persistent id"),
    ({"w": _Tensor(_Storage(("module", None, "0", "cpu", 2)))}, "unexpected persistent id"),
    ({"w": _Tensor(_float_storage(numel=-1))}, "has a bad size -1"),
    # the top level is not a dict of tensors
    ([_Tensor(_float_storage())], "holds a list, not a state dict"),
    ({"w": 3}, "entry 'w' is a int, not a tensor"),
    # negative or inconsistent geometry
    ({"w": _Tensor(_float_storage(), size=(-2,))}, "bad offset/size/stride"),
    ({"w": _Tensor(_float_storage(), stride=(-1,))}, "bad offset/size/stride"),
    ({"w": _Tensor(_float_storage(), offset=-1)}, "bad offset/size/stride"),
    ({"w": _Tensor(_float_storage(), size=(2, 1), stride=(1,))}, "bad offset/size/stride"),
    ({"w": _Tensor(_float_storage(), size=(3,))}, "reaches element 2"),
    ({"w": _Tensor(_float_storage(key="9"))}, "storage entry 'archive/data/9' is missing"),
])
def test_torch_zip_validation(tmp_path, obj, needle):
    path = _torch_zip(tmp_path / "m.bin", obj)
    with pytest.raises(CheckpointError) as e:
        TorchBinFile(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)


def test_torch_zip_storage_smaller_than_its_numel(tmp_path):
    path = _torch_zip(tmp_path / "m.bin", {"w": _Tensor(_float_storage(numel=4), size=(4,))},
                      {"0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="has 8 bytes, its 4 float32 elements need 16"):
        TorchBinFile(path)


# --- weights index -------------------------------------------------------------------

@pytest.mark.parametrize("index", [
    b"{not json", b"\xff\xfe", b"[]", b'{"metadata": {}}', b'{"weight_map": []}',
    b'{"weight_map": {"w": 3}}', b'{"weight_map": {"w": null}}', b'{"weight_map": "x"}',
])
@pytest.mark.parametrize("name", ["model.safetensors.index.json", "pytorch_model.bin.index.json"])
def test_malformed_weights_index(tiny_checkpoint, tmp_path, index, name):
    from dsflow.export.checkpoint.reader import Checkpoint
    model = tmp_path / "m"
    model.mkdir()
    shutil.copyfile(tiny_checkpoint / "config.json", model / "config.json")
    (model / name).write_bytes(index)
    with pytest.raises(CheckpointError, match=f"{name}: not a weights index"):
        Checkpoint(model)


# --- chat templates against the sandbox ------------------------------------------------

HOSTILE = {
    "class walk": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "subclasses loop": "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "function globals": "{{ cycler.__init__.__globals__ }}",
    "namespace globals": "{{ namespace.__init__.__globals__['os'] }}",
    "mutate messages": "{{ messages.append({'role': 'system', 'content': 'x'}) }}",
    "mutate a dict": "{% set d = messages[0] %}{{ d.update({'role': 'x'}) }}",
    "format string": "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "huge range": "{% for i in range(10**12) %}{% endfor %}",
}


def _tokenizer(tmp_path: Path, template: str):
    from dsflow.runtime.tokenizer import Tokenizer
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copyfile(TOKENIZER_DIR / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(d)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_chat_template_is_refused_by_the_sandbox(tmp_path, name):
    from dsflow.runtime.tokenizer import TokenizerError
    tok = _tokenizer(tmp_path, HOSTILE[name])
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(TokenizerError, match="the chat template was refused by the sandbox"
                       ) as e:
        tok.apply_chat_template(messages)
    assert str(e.value).startswith(str(tmp_path / "tok" / "tokenizer_config.json"))
    assert messages == [{"role": "user", "content": "hi"}]  # not mutated


def test_a_plain_template_still_renders(tmp_path):
    tok = _tokenizer(tmp_path, "{% for m in messages %}[{{ m.role }}] {{ m['content'] }}"
                               "{% endfor %}{{ eos_token }}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "[user] hi" + tok.eos_token


@pytest.mark.timeout(300)
def test_dsrun_chat_with_a_hostile_template_is_one_line(export_tiny, tmp_path):
    """End to end: artifacts whose tokenizer_config.json carries a hostile template."""
    from test_cli_errors import one_error_line, run_cmd
    art = tmp_path / "art"
    shutil.copytree(export_tiny(1), art)
    cfg_path = art / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = HOSTILE["function globals"]
    cfg_path.write_text(json.dumps(cfg))
    r = run_cmd("dsrun", "--artifacts", art, "--chat", "--prompt", "hi", timeout=240)
    line = one_error_line(r.stderr, "dsrun")
    assert r.returncode == 1 and "refused by the sandbox" in line, line
