"""A fake `mindspore_lite` for tests: the documented Python API surface the Lite backend
uses (mindspore-ai/mindspore-lite mindspore-lite/python/api/{context,model,tensor}.py),
recording every call in `CALLS`. It is put on sys.path only by tests/test_lite.py and
never installed. `KERNEL(model_path, arrays) -> arrays` computes predict's results.

Faithful where the backend could go wrong: DataType has the documented members only
(no BFLOAT16); `set_data_from_numpy` refuses a dtype or size mismatch; `predict`
requires `outputs` to be a list and fills the given output tensors in place;
`build_from_file` fails on a missing model or config path; ModelGroup's default flag
is SHARE_WORKSPACE, as in model.py.
"""
from __future__ import annotations

import itertools
import os
from enum import Enum

import numpy as np

IMPORT_ENV = {k: os.environ.get(k) for k in ("HCCL_NPU_SOCKET_PORT_RANGE",)}
CALLS: list[tuple] = []
KERNEL = None  # set by the test: (model_path, [np.ndarray]) -> [np.ndarray]
_ids = itertools.count()
if os.environ.get("DSFLOW_FAKE_LITE_KERNEL"):  # "module:function", for worker processes
    import importlib
    _mod, _fn = os.environ["DSFLOW_FAKE_LITE_KERNEL"].split(":")
    KERNEL = getattr(importlib.import_module(_mod), _fn)


class DataType(Enum):
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


_NP = {DataType.INT32: np.int32, DataType.INT64: np.int64, DataType.FLOAT16: np.float16,
       DataType.FLOAT32: np.float32, DataType.FLOAT64: np.float64, DataType.BOOL: np.bool_}
_FROM_NP = {np.dtype(v): k for k, v in _NP.items()}


class ModelType(Enum):
    MINDIR = 0
    MINDIR_LITE = 4


class ModelGroupFlag(Enum):
    SHARE_WEIGHT = 1
    SHARE_WORKSPACE = 2
    SHARE_WEIGHT_WORKSPACE = 3


class _Ascend:
    def __init__(self):
        self.device_id, self.rank_id, self.provider, self.precision_mode = 0, 0, "", ""


class Context:
    def __init__(self):
        self.ascend = _Ascend()
        self._target = ["cpu"]

    @property
    def target(self):
        return self._target

    @target.setter
    def target(self, target):
        for t in target:
            if t.lower() not in ("cpu", "gpu", "ascend"):
                raise ValueError(f"target elements must be in ['cpu', 'gpu', 'ascend'], got {t}")
        self._target = list(target)


class Tensor:
    def __init__(self, tensor=None, shape=None, dtype=None, device=None):
        self.tag = next(_ids)
        self.device = device
        if isinstance(tensor, np.ndarray):
            self._data = np.ascontiguousarray(tensor).copy()
            self._dtype = _FROM_NP[self._data.dtype]
        elif tensor is None and shape is not None and dtype is not None:
            self._dtype = dtype
            self._data = np.zeros(shape, _NP[dtype])
        else:
            raise TypeError("fake Tensor: numpy array, or shape + dtype")
        CALLS.append(("tensor", self.tag, list(self._data.shape), self._dtype, device))

    @property
    def shape(self):
        return list(self._data.shape)

    @property
    def dtype(self):
        return self._dtype

    def get_data_to_numpy(self):
        return self._data.copy()

    def set_data_from_numpy(self, array):
        if not isinstance(array, np.ndarray):
            raise TypeError("numpy_obj must be numpy.ndarray")
        if _FROM_NP.get(array.dtype) != self._dtype:
            raise RuntimeError(f"data type not equal! Numpy type: {array.dtype}, "
                               f"Tensor type: {self._dtype}")
        if array.nbytes != self._data.nbytes:
            raise RuntimeError("data size not equal!")
        self._data = array.reshape(self._data.shape).copy()


class Model:
    def __init__(self):
        self.tag = next(_ids)
        self.model_path_ = ""
        self._inputs: list[Tensor] = []

    def build_from_file(self, model_path, model_type, context=None, config_path="",
                        config_dict=None):
        if not os.path.exists(model_path):
            raise RuntimeError("build_from_file failed, model_path does not exist!")
        if config_path and not os.path.exists(config_path):
            raise RuntimeError("build_from_file failed, config_path does not exist!")
        asc = context.ascend
        CALLS.append(("build", self.tag, model_path, model_type, config_path, config_dict,
                      {"target": context.target, "device_id": asc.device_id,
                       "rank_id": asc.rank_id, "provider": asc.provider,
                       "precision_mode": asc.precision_mode}))
        self.model_path_ = model_path

    def get_inputs(self):
        return self._inputs

    def resize(self, inputs, dims):
        CALLS.append(("resize", self.tag, [list(d) for d in dims]))
        self._inputs = [Tensor(shape=d, dtype=DataType.FLOAT32) for d in dims]

    def predict(self, inputs, outputs=None):
        if not self.model_path_:
            raise RuntimeError("predict before build")
        if outputs is not None and not isinstance(outputs, list):
            raise TypeError("outputs must be list")
        arrays = [t.get_data_to_numpy() for t in inputs]
        if self._inputs and [a.shape for a in arrays] != [tuple(t.shape) for t in self._inputs]:
            raise RuntimeError("input shapes differ from the last resize")
        CALLS.append(("predict", self.tag, [list(a.shape) for a in arrays],
                      [t.tag for t in inputs], [t.tag for t in outputs or []]))
        results = KERNEL(self.model_path_, arrays)
        if outputs is None:
            return [Tensor(r) for r in results]
        for t, r in zip(outputs, results):
            t.set_data_from_numpy(np.ascontiguousarray(r.astype(_NP[t.dtype])))
        return outputs


class ModelGroup:
    def __init__(self, flags=ModelGroupFlag.SHARE_WORKSPACE):
        self.flags = flags
        CALLS.append(("group", flags))

    def add_model(self, models):
        if any(m.model_path_ for m in models):
            raise RuntimeError("fake: models must join the group before they are built")
        CALLS.append(("add_model", [m.tag for m in models]))
