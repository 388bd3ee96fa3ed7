"""A fake `mindspore_lite` for tests: the Python API surface the Lite backend uses,
recording every call in `CALLS`. It is put on sys.path only by the tests and never
installed. Hooks (set by a test, or by "module:function" environment variables in
worker processes):
  KERNEL(model_path, arrays) -> arrays     what predict computes
  INPUTS(model_path) -> [(shape, DataType)] the graph's inputs in order (-1: dynamic)

As strict as the real API wherever the backend could go wrong. Each rule names the file
of mindspore-ai/mindspore-lite (mindspore-lite/python/api/..., or the C++ under
mindspore-lite/src/...) it reproduces; rules marked "fake:" are this fake's own
invariants, not the library's. Written from reading those sources, not copied.

Two releases (tests run the Lite backend against both, tests/test_lite.py `fake_lite`):
  - "2.7": the GE executor of mindspore-lite up to mid-2026 (the 2025-07 snapshot of
    src/extendrt/delegate/ascend_ge/ge_graph_executor.cc, shipped in 2.3-2.7): predict
    reads each input through MSTensor::Data() and memcpys each output into its host
    buffer, so a device tensor (`device="ascend:N"`) as an input or output is refused
    here (on a card: a null host pointer, i.e. an error or a crash);
  - "2026": the 2026 ge_graph_executor.cc that adds zero-copy: device tensors are
    passed to GE as they are.
`DSFLOW_FAKE_LITE_VERSION` sets `__version__` (default 2.10.0) and
`DSFLOW_FAKE_LITE_ZERO_COPY` ("1"/"0") the executor; unset, releases from 2.10 on are
zero-copy (what dsflow assumes: artifacts/lite.py ZERO_COPY_RELEASE).
"""
from __future__ import annotations

import importlib
import itertools
import os
import re
from enum import Enum

import numpy as np

# version.py: the package's __version__ (released in step with MindSpore's)
__version__ = os.environ.get("DSFLOW_FAKE_LITE_VERSION", "2.10.0")


def _zero_copy() -> bool:
    """fake: which executor this release has (module docstring)."""
    flag = os.environ.get("DSFLOW_FAKE_LITE_ZERO_COPY", "")
    if flag:
        return flag not in ("0", "false", "no")
    m = re.match(r"(\d+)\.(\d+)", __version__)
    return bool(m) and (int(m[1]), int(m[2])) >= (2, 10)


ZERO_COPY = _zero_copy()
IMPORT_ENV = {k: os.environ.get(k) for k in ("HCCL_NPU_SOCKET_PORT_RANGE",
                                             "HCCL_CONNECT_TIMEOUT")}
CALLS: list[tuple] = []
_ids = itertools.count()


def _hook(env: str):
    if not os.environ.get(env):
        return None
    module, fn = os.environ[env].split(":")
    return getattr(importlib.import_module(module), fn)


KERNEL = _hook("DSFLOW_FAKE_LITE_KERNEL")
INPUTS = _hook("DSFLOW_FAKE_LITE_INPUTS")


def _check_type(name: str, value, classes) -> None:
    """_checkparam.py check_isinstance: TypeError naming the argument."""
    if not isinstance(value, classes):
        raise TypeError(f"{name} must be {getattr(classes, '__name__', classes)}, "
                        f"but got {type(value)}.")


class DataType(Enum):
    """tensor.py DataType: no BFLOAT16 member."""
    UNKNOWN = 0
    BOOL = 30
    INT8 = 32
    INT16 = 33
    INT32 = 34
    INT64 = 35
    UINT8 = 37
    UINT16 = 38
    UINT32 = 39
    UINT64 = 40
    FLOAT16 = 42
    FLOAT32 = 43
    FLOAT64 = 44
    INVALID = 2147483647


_NP = {DataType.BOOL: np.bool_, DataType.INT8: np.int8, DataType.INT16: np.int16,
       DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.UINT8: np.uint8,
       DataType.UINT16: np.uint16, DataType.UINT32: np.uint32, DataType.UINT64: np.uint64,
       DataType.FLOAT16: np.float16, DataType.FLOAT32: np.float32,
       DataType.FLOAT64: np.float64}
_FROM_NP = {np.dtype(v).type: k for k, v in _NP.items()}


class ModelType(Enum):
    MINDIR = 0
    MINDIR_LITE = 4


class ModelGroupFlag(Enum):
    SHARE_WEIGHT = 1
    SHARE_WORKSPACE = 2
    SHARE_WEIGHT_WORKSPACE = 3


# context.py _Ascend.precision_mode setter: exactly these five
PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "enforce_fp16", "enforce_origin",
                   "preferred_optimal")


def _non_negative_int(name: str, value) -> int:
    """context.py _Ascend.device_id / rank_id setters: int (TypeError), >= 0 (ValueError)."""
    _check_type(name, value, int)
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int.")
    return value


class _Ascend:
    def __init__(self):
        self._device_id, self._rank_id, self._provider, self._precision = 0, 0, "", ""

    @property
    def device_id(self):
        return self._device_id

    @device_id.setter
    def device_id(self, value):
        self._device_id = _non_negative_int("ascend_device_id", value)

    @property
    def rank_id(self):
        return self._rank_id

    @rank_id.setter
    def rank_id(self, value):
        self._rank_id = _non_negative_int("ascend_rank_id", value)

    @property
    def provider(self):
        return self._provider

    @provider.setter
    def provider(self, value):
        _check_type("ascend_provider", value, str)  # context.py: any str
        self._provider = value

    @property
    def precision_mode(self):
        return self._precision

    @precision_mode.setter
    def precision_mode(self, value):
        _check_type("ascend_precision_mode", value, str)
        if value not in PRECISION_MODES:
            raise ValueError(f"ascend_precision_mode must be in [{', '.join(PRECISION_MODES)}], "
                             f"but got {value}.")
        self._precision = value


class Context:
    def __init__(self):
        self.ascend = _Ascend()
        self._target = ["cpu"]

    @property
    def target(self):
        return self._target

    @target.setter
    def target(self, target):
        """context.py Context.target: a list (TypeError) of str (TypeError), each one of
        cpu/gpu/ascend in any case (ValueError)."""
        target = target or ["cpu"]
        _check_type("target", target, list)
        for t in target:
            _check_type("target element", t, str)
            if t.lower() not in ("cpu", "gpu", "ascend"):
                raise ValueError(f"target elements must be in ['cpu', 'gpu', 'ascend'], "
                                 f"but got {t.lower()}.")
        self._target = list(target)


def _check_shape_and_device(shape, device) -> None:
    """_checkparam.py check_tensor_input_param: shape a list/tuple of int; device a str
    'ascend' or 'ascend:<digits>' (TypeError otherwise)."""
    if shape is not None:
        _check_type("shape", shape, (list, tuple))
        for i, d in enumerate(shape):
            if not isinstance(d, int):
                raise TypeError(f"shape element must be int, but got {type(d)} at index {i}.")
    if device is None:
        return
    _check_type("device", device, str)
    parts = device.split(":")
    if len(parts) > 2:
        raise TypeError("device must be 'ascend:index', eg: 'ascend:0'")
    if parts[0] != "ascend":
        raise TypeError("now only support ascend device.")
    if len(parts) == 2 and not parts[1].isdigit():
        raise TypeError("device id should >= 0.")


class Tensor:
    """tensor.py Tensor(tensor=None, shape=None, dtype=None, device=None).

    Where the data lives, after src/litert/cxx_api/types.cc and python/api/
    lite_tensor_pybind.cc (create_tensor, create_tensor_by_numpy):
      - from numpy: a host buffer (the array's), plus device memory holding a copy when
        `device` is given;
      - `shape` and `dtype` alone, no device: NO buffer at all
        (MSTensor::CreateTensor(name, type, shape, nullptr, 0)); the executor refuses it
        as an output (`Model.predict`);
      - `shape`, `dtype` and a device: device memory only.
    """

    def __init__(self, tensor=None, shape=None, dtype=None, device=None, _log=True):
        _check_shape_and_device(shape, device)
        if dtype is not None:
            _check_type("dtype", dtype, DataType)
        self.tag = next(_ids)
        self.device = device
        self._shape = None  # shape of a tensor with no buffer
        if isinstance(tensor, Tensor):
            tensor = tensor.get_data_to_numpy()
        if isinstance(tensor, np.ndarray):
            if tensor.dtype.type not in _FROM_NP:
                raise TypeError(f"Unsupported numpy dtype value {tensor.dtype}")
            if shape is not None and list(shape) != list(tensor.shape):
                raise TypeError("user set shape is not equal numpy shape")
            if dtype is not None and _FROM_NP[tensor.dtype.type] != dtype:
                raise TypeError("user set dtype is not equal numpy dtype")
            self._data = np.ascontiguousarray(tensor).copy()
            self._dtype = _FROM_NP[tensor.dtype.type]
            self._moved("upload")  # lite_tensor_pybind.cc create_tensor_by_numpy
        elif tensor is not None:
            raise TypeError(f"tensor must be MindSpore Lite's Tensor._tensor or numpy ndarray, "
                            f"but got {type(tensor)}.")
        elif shape is not None and dtype is not None:
            self._dtype = dtype
            if device is None or any(d < 0 for d in shape):  # types.cc: no buffer
                self._shape, self._data = list(shape), None
            else:  # device memory (AscendAllocatorPlugin::Malloc), contents undefined
                self._data = np.zeros(shape, _NP[dtype])
        else:  # tensor.py: an empty float32 tensor
            self._dtype, self._data = DataType.FLOAT32, np.zeros((), np.float32)
        if _log:
            CALLS.append(("tensor", self.tag, self.shape, self._dtype, device))

    def _moved(self, direction: str) -> None:
        """fake: a host<->device copy of a device tensor's data, logged as
        ("upload" | "download", tag, bytes) so tests can count what crosses PCIe."""
        if self.device is not None and self._data is not None:
            CALLS.append((direction, self.tag, self._data.nbytes))

    @property
    def has_buffer(self) -> bool:
        """fake: whether the tensor holds data (host or device) an executor can use."""
        return self._data is not None

    def _peek(self):
        """fake: the data as the graph sees it (no copy logged: it stays on its side)."""
        if self._data is None:
            raise RuntimeError("fake: tensor without a buffer holds no data")
        return self._data

    @property
    def shape(self):
        return list(self._shape) if self._data is None else list(self._data.shape)

    @property
    def dtype(self):
        return self._dtype

    @property
    def data_size(self):
        """types.cc MSTensor::DataSize: elements x item size, whether or not a buffer
        exists (0 for a dynamic shape)."""
        if self._data is not None:
            return self._data.nbytes
        if any(d < 0 for d in self._shape):
            return 0
        return int(np.prod(self._shape, dtype=np.int64)) * np.dtype(_NP[self._dtype]).itemsize

    def get_data_to_numpy(self):
        """tensor.py get_data_to_numpy: a copy on the host (from the device for a
        device tensor: logged as a download)."""
        data = self._peek().copy()
        self._moved("download")
        return data

    def set_data_from_numpy(self, array):
        """tensor.py set_data_from_numpy: an ndarray (TypeError) of a known numpy dtype
        (TypeError); then the C++ binding, lite_tensor_pybind.cc SetTensorNumpyData,
        which returns False when the array's dtype or byte size differ from the
        tensor's (or a device copy fails) and True once the data is set: a host tensor
        takes the array as its buffer, a device tensor gets a host-to-device copy.

        The 2025-07 tensor.py raises RuntimeError itself for a dtype or size mismatch
        and then drops the binding's bool (returns None); this fake hands the bool back
        instead, the harder case for a caller, which must treat both a raise and a
        False as a failed copy."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"numpy_obj must be numpy.ndarray, but got {type(array)}.")
        if array.dtype.type not in _FROM_NP:
            raise TypeError(f"Unsupported numpy dtype value {array.dtype}")
        if _FROM_NP[array.dtype.type] != self._dtype or array.nbytes != self.data_size:
            return False
        shape = self.shape
        self._data = np.ascontiguousarray(array).reshape(shape).copy()
        self._shape = None
        self._moved("upload")
        return True


def _check_config_dict(config_dict) -> None:
    """model.py build_from_file: config_dict is {str: {str: str}} (TypeError otherwise)."""
    _check_type("config_dict", config_dict, dict)
    for key, section in config_dict.items():
        _check_type("config_dict_key", key, str)
        _check_type("config_dict_value", section, dict)
        for k, v in section.items():
            _check_type("config_dict_value_key", k, str)
            _check_type("config_dict_value_value", v, str)


class Model:
    def __init__(self):
        self.tag = next(_ids)
        self.model_path_ = ""
        self.group = None
        self._inputs: list[Tensor] = []  # C++ model: no inputs before a build

    def build_from_file(self, model_path, model_type, context=None, config_path="",
                        config_dict=None):
        """model.py build_from_file: argument types (TypeError), paths exist
        (RuntimeError), config_dict's shape when given (TypeError)."""
        _check_type("model_path", model_path, str)
        _check_type("model_type", model_type, ModelType)
        context = Context() if context is None else context
        _check_type("context", context, Context)
        _check_type("config_path", config_path, str)
        if not os.path.exists(model_path):
            raise RuntimeError("build_from_file failed, model_path does not exist!")
        if config_path and not os.path.exists(config_path):
            raise RuntimeError("build_from_file failed, config_path does not exist!")
        if config_dict:
            _check_config_dict(config_dict)
        if INPUTS is None:
            raise RuntimeError("fake: set mindspore_lite.INPUTS (the graph's inputs)")
        asc = context.ascend
        CALLS.append(("build", self.tag, model_path, model_type, config_path, config_dict,
                      {"target": context.target, "device_id": asc.device_id,
                       "rank_id": asc.rank_id, "provider": asc.provider,
                       "precision_mode": asc.precision_mode}))
        self.model_path_ = model_path
        self.device_id = asc.device_id
        self._inputs = [Tensor(shape=list(shape), dtype=dtype, _log=False)
                        for shape, dtype in INPUTS(model_path)]

    def get_inputs(self):
        """base_model.py get_inputs: the built graph's input tensors, in order."""
        return list(self._inputs)

    def resize(self, inputs, dims):
        """base_model.py resize: inputs a list/tuple of Tensor, dims a list/tuple of
        lists/tuples of int (TypeError), as many dims as inputs (ValueError)."""
        _check_type("inputs", inputs, (list, tuple))
        _check_type("dims", dims, (list, tuple))
        for t in inputs:
            _check_type("inputs element", t, Tensor)
        for shape in dims:
            _check_type("dims element", shape, (list, tuple))
            for d in shape:
                _check_type("dims element's element", d, int)
        if len(inputs) != len(dims):
            raise ValueError(f"inputs' size does not match dims' size, but got "
                             f"inputs: {len(inputs)} and dims: {len(dims)}.")
        # src/extendrt/cxx_api/model/model_impl.cc ModelImpl::Resize: a built model, every
        # dim in 1..INT_MAX, one shape per model input (Python: "resize failed!")
        if not self.model_path_:
            raise RuntimeError("resize failed! Model has not been called Build")
        if any(d <= 0 or d > 2**31 - 1 for shape in dims for d in shape):
            raise RuntimeError(f"resize failed! Invalid shape in {list(dims)}")
        if not dims or len(dims) != len(self._inputs):
            raise RuntimeError(f"resize failed! {len(dims)} shapes for "
                               f"{len(self._inputs)} inputs")
        CALLS.append(("resize", self.tag, [list(d) for d in dims]))
        self._inputs = [Tensor(shape=list(d), dtype=t.dtype, _log=False)
                        for d, t in zip(dims, self._inputs)]

    def predict(self, inputs, outputs=None):
        """model.py predict: inputs a list/tuple (TypeError) with exactly as many items as
        get_inputs() (RuntimeError), each a Tensor or ndarray (TypeError); base_model.py:
        outputs a list (TypeError) of Tensor (TypeError)."""
        if not self.model_path_:
            raise RuntimeError("fake: predict before build")
        _check_type("inputs", inputs, (list, tuple))
        if len(inputs) != len(self._inputs):
            raise RuntimeError(f"model input len:{len(self._inputs)} not equal input "
                               f"len:{len(inputs)}!")
        inputs = [Tensor(t, _log=False) if isinstance(t, np.ndarray) else t for t in inputs]
        for t in inputs:
            _check_type("inputs element", t, Tensor)
        if outputs is not None:
            _check_type("outputs", outputs, list)
            for t in outputs:
                _check_type("outputs element", t, Tensor)
        self._check_devices(inputs, outputs or [])
        self._check_buffers(inputs, outputs or [])
        arrays = [t._peek().copy() for t in inputs]  # read where they are: no transfer
        # fake: the backend keeps resize in step with what it feeds, in the graph's dtypes
        if [list(a.shape) for a in arrays] != [t.shape for t in self._inputs]:
            raise RuntimeError("fake: input shapes differ from the last resize")
        if [t.dtype for t in inputs] != [t.dtype for t in self._inputs]:
            raise RuntimeError("fake: input dtypes differ from the graph's")
        CALLS.append(("predict", self.tag, [list(a.shape) for a in arrays],
                      [t.tag for t in inputs], [t.tag for t in outputs or []],
                      [t.device for t in inputs], [t.device for t in outputs or []]))
        results = KERNEL(self.model_path_, arrays)
        if outputs is None:
            return [Tensor(r) for r in results]
        # src/extendrt/cxx_api/model/model_impl.cc Predict: as many outputs as the graph
        # has ("output size is wrong!"; model.py then raises "predict failed!")
        if len(outputs) != len(results):
            raise RuntimeError("predict failed!")
        for t, r in zip(outputs, results):
            # fake: GE writes the graph's output into the given buffer as is, so its
            # shape and dtype must be the output's (a smaller buffer would be overrun)
            if t.shape != list(r.shape) or _NP[t.dtype] != r.dtype:
                raise RuntimeError(f"fake: output tensor {t.shape} {t.dtype} does not "
                                   f"match the graph's output {list(r.shape)} {r.dtype}")
        for t, r in zip(outputs, results):
            t._data = np.ascontiguousarray(r).copy()  # written where it lives: no transfer
        return outputs

    @staticmethod
    def _check_buffers(inputs, outputs) -> None:
        """src/extendrt/delegate/ascend_ge/ge_graph_executor.cc (RunGraph: inputs and
        preallocated outputs become GE tensors through their data pointers):
          - an input or output with no buffer is refused ("Input/Output data ptr is
            nullptr"): `Tensor(shape=, dtype=)` without a device has none (types.cc);
          - before the 2026 zero-copy change the executor takes every tensor's host
            pointer, MSTensor::Data(), and memcpys outputs into it, so a device tensor
            cannot be passed (its host pointer is null: on a card an error or a crash);
            only a ZERO_COPY release hands device memory to GE as it is."""
        for what, tensors in (("Input", inputs), ("Output", outputs)):
            for t in tensors:
                if not t.has_buffer:
                    raise RuntimeError(f"{what} data ptr is nullptr (tensor {t.tag} "
                                       f"{t.shape} {t.dtype}: created with no buffer)")
                if t.device and not ZERO_COPY:
                    raise RuntimeError(
                        f"{what} data ptr is nullptr: mindspore_lite {__version__} reads "
                        f"predict tensors on the host, and tensor {t.tag} is on {t.device} "
                        "(device tensors need the zero-copy GE executor)")

    def _check_devices(self, inputs, outputs) -> None:
        """fake: a device tensor must be on this model's card (Context device_id), and
        no tensor may be both an input and an output of one predict (GE may write an
        output while still reading that input: the reason for a ping-pong pair)."""
        for t in [*inputs, *outputs]:
            if t.device and ":" in t.device and int(t.device.split(":")[1]) != self.device_id:
                raise RuntimeError(f"fake: tensor on {t.device} given to a model on "
                                   f"ascend:{self.device_id}")
        if {id(t) for t in inputs} & {id(t) for t in outputs}:
            raise RuntimeError("fake: a tensor is both an input and an output of predict")


class ModelGroup:
    def __init__(self, flags=ModelGroupFlag.SHARE_WORKSPACE):
        """model.py ModelGroup: the default flag is SHARE_WORKSPACE (whatever its docstring
        says); anything but a ModelGroupFlag member is a RuntimeError."""
        if not isinstance(flags, ModelGroupFlag):
            raise RuntimeError("Parameter flags should be ModelGroupFlag.SHARE_WORKSPACE or "
                               "ModelGroupFlag.SHARE_WEIGHT or "
                               "ModelGroupFlag.kShareWeightAndWorkspace")
        self.flags = flags
        CALLS.append(("group", flags))

    def add_model(self, models):
        """model.py add_model: a non-empty list/tuple (TypeError / RuntimeError) of all str
        or all Model (TypeError). src/extendrt/cxx_api/model/model_group_impl.cc
        AddModel(models): Model objects only with SHARE_WEIGHT, and a model in one group
        only (the Python layer turns both into RuntimeError)."""
        _check_type("models", models, (list, tuple))
        if not models:
            raise RuntimeError("models cannot be empty")
        kind = str if isinstance(models[0], str) else Model
        for m in models:
            if not isinstance(m, kind):
                raise TypeError(f"models element must be all str or Model, but got {type(m)}")
        if kind is Model:
            if self.flags != ModelGroupFlag.SHARE_WEIGHT or any(m.group for m in models):
                raise RuntimeError("ModelGroup's add model failed.")
            # fake: the group id is a config entry the build reads, so join first
            if any(m.model_path_ for m in models):
                raise RuntimeError("fake: models must join the group before they are built")
            for m in models:
                m.group = self
        CALLS.append(("add_model", [getattr(m, "tag", m) for m in models]))
