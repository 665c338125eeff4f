"""The wire format of skfedmm on Flower: Flower records, never pickles.

Every request the server sends and every reply a node sends is a Flower
:class:`~flwr.app.RecordDict` of :class:`~flwr.app.ArrayRecord` (arrays)
and :class:`~flwr.app.ConfigRecord` (ints, floats, strings, booleans and
lists of them). Objects travel as *descriptions* that the other side
rebuilds from an allow-list:

- a problem (:class:`~skfedmm.problems.MMProblem`): its class (one of
  :mod:`skfedmm.problems` or a class given to :func:`register_problem`), its
  constructor parameters (read from the ``__init__`` signature: each must
  be stored under its own name) and its fit-time constants (the public
  attributes ending in ``_`` that :meth:`MMProblem.prepare` sets);
- a compressor: its registered name and constructor parameters;
- the client configuration (:class:`~skfedmm.federation.client.ClientConfig`):
  the statistic's and the parameter's layouts as names and shapes;
- a client state: the control variate and its log-coordinates as arrays,
  the PCG64 bit generator's state with its 128-bit integers as decimal
  strings.

Both sides check every message before using it (:func:`decode_request` on
the node, :func:`decode_reply` on the server): expected keys, array dtypes
and shapes, finiteness. A malformed message raises :class:`WireError` and
nothing of it is applied.
"""

import hashlib
import inspect
import math
from numbers import Integral, Real

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from .._messages import InvalidMessageError, ParamLayout, StatLayout
from ..compression import _COMPRESSORS, Compressor
from ..federation.client import ClientConfig, ClientMessage, ClientState, Unverified

__all__ = [
    "MESSAGE_TYPE",
    "PROTOCOL",
    "WireError",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "register_problem",
]

#: Flower message type of every skfedmm request (``@app.query("skfedmm")``).
MESSAGE_TYPE = "query.skfedmm"
#: Version of this wire format; both sides refuse another.
PROTOCOL = "skfedmm/1"
#: Tasks a node runs: "info" (rows, features, dtype) and the client tasks.
TASKS = ("info", "init", "full", "loss", "surrogate", "parameter", "init_compressed",
         "full_compressed")
#: Tasks whose request carries the fit's compressor and a seed (compressed
#: initialization messages).
_COMPRESSED_INIT = ("init_compressed", "full_compressed")
_FLOATS = ("float32", "float64")


class WireError(InvalidMessageError):
    """A message that does not follow the wire format; nothing of it is applied."""


# --------------------------------------------------------------------------
# Allow-lists
# --------------------------------------------------------------------------
_REGISTERED = {}


def _path(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _builtin_problems():
    from .. import problems

    return {_path(getattr(problems, name)): getattr(problems, name)
            for name in problems.__all__ if name != "MMProblem"}


def register_problem(cls):
    """Allow a user-defined problem class on the wire (server and nodes).

    Nodes rebuild only problems of :mod:`skfedmm.problems` and registered
    classes: call this at import time of both the server app and the
    client app (the module defining ``cls`` must be importable on the
    nodes). Usable as a class decorator.

    Parameters
    ----------
    cls : type
        A subclass of :class:`~skfedmm.problems.MMProblem` whose
        constructor parameters are stored under their own names.

    Returns
    -------
    cls : type
    """
    from ..problems import MMProblem

    if not (isinstance(cls, type) and issubclass(cls, MMProblem)):
        raise TypeError(f"register_problem expects an MMProblem subclass, got {cls!r}.")
    _REGISTERED[_path(cls)] = cls
    return cls


def _problem_class(path):
    allowed = {**_builtin_problems(), **_REGISTERED}
    if path not in allowed:
        raise WireError(
            f"problem class {path!r} is not allowed (skfedmm.problems or "
            "skfedmm.flower.register_problem)"
        )
    return allowed[path]


# --------------------------------------------------------------------------
# Values: arrays as arrays, scalars and strings as config
# --------------------------------------------------------------------------
def _encode_values(values, cfg, arrays, prefix):
    """Put named values into ``cfg`` / ``arrays`` under ``prefix``."""
    none = []
    for name, value in values.items():
        key = f"{prefix}{name}"
        if value is None:
            none.append(name)
        elif isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise TypeError(f"{key}: arrays of dtype {value.dtype} cannot travel")
            arrays[key] = Array(np.ascontiguousarray(value))
        elif isinstance(value, np.dtype):
            cfg[f"{prefix}dtype:{name}"] = str(value)
        elif isinstance(value, (bool, np.bool_)):
            cfg[key] = bool(value)
        elif isinstance(value, Integral):
            cfg[key] = int(value)
        elif isinstance(value, Real):
            cfg[key] = float(value)
        elif isinstance(value, str):
            cfg[key] = value
        elif isinstance(value, list) and len({type(v) for v in value}) == 1 and isinstance(
                value[0], (bool, int, float, str)):
            cfg[key] = list(value)  # a list of plain values of one type
        else:
            raise TypeError(
                f"{key}: a value of type {type(value).__name__} cannot travel (arrays, numbers, "
                "strings, booleans and None only)"
            )
    cfg[f"{prefix}:none"] = none


def _decode_values(cfg, arrays, prefix):
    out = {}
    for name in cfg.get(f"{prefix}:none", []):
        out[str(name)] = None
    for key, value in cfg.items():
        if not key.startswith(prefix) or key == f"{prefix}:none":
            continue
        name = key[len(prefix):]
        if name.startswith("dtype:"):
            try:
                out[name[6:]] = np.dtype(str(value))
            except TypeError as exc:
                raise WireError(f"{key}: not a dtype ({value!r})") from exc
        elif ":" not in name:
            out[name] = value
    for key in arrays.keys():
        if key.startswith(prefix):
            value = _array(arrays, key)
            out[key[len(prefix):]] = value
    return out


def _array(arrays, key):
    try:
        value = arrays[key].numpy()
    except Exception as exc:  # noqa: BLE001 - whatever a malformed Array raises
        raise WireError(f"{key!r} is not a readable array ({exc})") from exc
    if value.dtype.kind not in "biuf":
        raise WireError(f"{key!r} has dtype {value.dtype}; expected real numbers")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
        raise WireError(f"{key!r} is not finite")
    return value


def constructor_params(obj):
    """The constructor parameters of ``obj``, read from its ``__init__`` signature.

    Parameters
    ----------
    obj : object
        An object storing each constructor parameter under its own name
        (as scikit-learn estimators do).

    Returns
    -------
    params : dict
    """
    out = {}
    for name, p in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(obj, name):
            raise TypeError(
                f"{type(obj).__name__} does not store its constructor parameter {name!r} "
                "under that name, so it cannot be rebuilt on the nodes"
            )
        out[name] = getattr(obj, name)
    return out


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------
#: Fit-time constants the clients' statistic and loss read, for the built-in
#: problems (a problem may declare its own in a ``client_constants`` attribute;
#: by default all of them travel). The clients of parameter aggregation run
#: the M-step too: they get every constant.
_CLIENT_CONSTANTS = {
    "skfedmm.problems.dictionary.DictionaryLearningProblem": (),
    "skfedmm.problems.ot.EntropicOTProblem": ("cost_scale_",),
}


def _fit_constants(problem, all_constants):
    constants = {
        k: v for k, v in vars(problem).items() if k.endswith("_") and not k.startswith("_")
    }
    if all_constants:
        return constants
    wanted = getattr(problem, "client_constants", _CLIENT_CONSTANTS.get(_path(type(problem))))
    if wanted is None:
        return constants
    return {k: v for k, v in constants.items() if k in wanted}


def encode_problem(problem, all_constants=True):
    """The problem as (config, arrays): class, parameters, fit-time constants.

    Parameters
    ----------
    problem : MMProblem
    all_constants : bool, default=True
        Send every fit-time constant (the public attributes ending in ``_``),
        or only those the clients' statistic and loss read (the problem's
        ``client_constants``; for example a dictionary problem's pooled
        second moment, a server-side constant, does not travel).

    Returns
    -------
    cfg : ConfigRecord
    arrays : ArrayRecord
    """
    path = _path(type(problem))
    _problem_class(path)  # refuse early what the nodes would refuse
    cfg, arrays = ConfigRecord(), ArrayRecord()
    cfg["class"] = path
    _encode_values(constructor_params(problem), cfg, arrays, "p.")
    _encode_values(_fit_constants(problem, all_constants), cfg, arrays, "c.")
    return cfg, arrays


def decode_problem(cfg, arrays):
    """Rebuild a problem from :func:`encode_problem`'s records."""
    path = cfg.get("class")
    if not isinstance(path, str):
        raise WireError("the problem has no class")
    cls = _problem_class(path)
    params = _decode_values(cfg, arrays, "p.")
    try:
        problem = cls(**params)
    except Exception as exc:  # noqa: BLE001 - the class's own validation
        raise WireError(f"the problem {path} could not be rebuilt: {exc}") from exc
    for name, value in _decode_values(cfg, arrays, "c.").items():
        if not (name.endswith("_") and not name.startswith("_")):
            raise WireError(f"the problem constant {name!r} is not a fit-time constant")
        setattr(problem, name, value)
    return problem


def records_digest(*records):
    """A digest of config and array records (to send a problem once)."""
    h = hashlib.sha256()
    for rec in records:
        for key in sorted(rec.keys()):
            h.update(key.encode())
            value = rec[key]
            if isinstance(value, Array):
                h.update(value.dtype.encode())
                h.update(repr(tuple(value.shape)).encode())
                h.update(value.data)
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------
# Layouts, compressor, client configuration
# --------------------------------------------------------------------------
def _encode_layout(layout, cfg, prefix):
    cfg[f"{prefix}names"] = list(layout.names)
    cfg[f"{prefix}ndims"] = [len(s) for s in layout.shapes]
    cfg[f"{prefix}dims"] = [int(n) for s in layout.shapes for n in s]


def _decode_shapes(cfg, prefix):
    try:
        names = [str(n) for n in cfg[f"{prefix}names"]]
        ndims = [int(n) for n in cfg[f"{prefix}ndims"]]
        dims = [int(n) for n in cfg[f"{prefix}dims"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"the layout {prefix!r} is incomplete ({exc})") from exc
    if len(ndims) != len(names) or sum(ndims) != len(dims) or min(dims, default=0) < 0:
        raise WireError(f"the layout {prefix!r} is inconsistent")
    if len(set(names)) != len(names) or not names:
        raise WireError(f"the layout {prefix!r} has no or repeated names")
    shapes, start = {}, 0
    for name, nd in zip(names, ndims):
        shapes[name] = tuple(dims[start : start + nd])
        start += nd
    return shapes


def _compressor_name(compressor):
    for name, cls in _COMPRESSORS.items():
        if type(compressor) is cls:
            return name
    raise TypeError(
        f"the compressor {type(compressor).__name__} is not one of skfedmm's "
        f"({sorted(_COMPRESSORS)}); a deployment sends compressors by name"
    )


def _encode_compressor(compressor, cfg):
    cfg["compressor"] = _compressor_name(compressor)
    _encode_values(constructor_params(compressor), cfg, ArrayRecord(), "compressor.")


def _decode_compressor(cfg):
    name = cfg.get("compressor")
    if name not in _COMPRESSORS:
        raise WireError(f"unknown compressor {name!r}")
    params = _decode_values(cfg, ArrayRecord(), "compressor.")
    try:
        return _COMPRESSORS[name](**params)
    except Exception as exc:  # noqa: BLE001
        raise WireError(f"the compressor {name!r} could not be rebuilt: {exc}") from exc


def encode_config(cfg_obj):
    """A :class:`ClientConfig` as a ConfigRecord."""
    cfg = ConfigRecord()
    _encode_layout(cfg_obj.layout, cfg, "layout.")
    param = cfg_obj.param_layout
    _encode_layout(param, cfg, "param.")
    cfg["param.is_dict"] = bool(param.is_dict)
    _encode_compressor(cfg_obj.compressor, cfg)
    cfg["cv_rate"] = float(cfg_obj.cv_rate)
    cfg["batch_size"] = -1 if cfg_obj.batch_size is None else int(cfg_obj.batch_size)
    cfg["local_steps"] = int(cfg_obj.local_steps)
    cfg["dtype"] = np.dtype(cfg_obj.dtype).name
    cfg["pin"] = bool(cfg_obj.pin)
    return cfg


def decode_config(cfg):
    """Rebuild a :class:`ClientConfig` from :func:`encode_config`'s record."""
    layout = StatLayout(_decode_shapes(cfg, "layout."))
    shapes = _decode_shapes(cfg, "param.")
    is_dict = cfg.get("param.is_dict")
    if not isinstance(is_dict, bool) or (not is_dict and list(shapes) != ["theta"]):
        raise WireError("the parameter layout is inconsistent")
    param_layout = ParamLayout(
        {k: np.empty(s) for k, s in shapes.items()} if is_dict else np.empty(shapes["theta"])
    )
    compressor = _decode_compressor(cfg)
    dtype = cfg.get("dtype")
    if dtype not in _FLOATS:
        raise WireError(f"the dtype {dtype!r} is not float32 or float64")
    cv_rate = cfg.get("cv_rate")
    if not isinstance(cv_rate, float) or not math.isfinite(cv_rate):
        raise WireError(f"cv_rate must be a finite float, got {cv_rate!r}")
    batch_size, local_steps = cfg.get("batch_size"), cfg.get("local_steps")
    if not isinstance(batch_size, int) or batch_size == 0 or batch_size < -1:
        raise WireError(f"batch_size must be a positive int (or -1 for all rows), got {batch_size!r}")
    if not isinstance(local_steps, int) or local_steps < 1:
        raise WireError(f"local_steps must be a positive int, got {local_steps!r}")
    pin = cfg.get("pin")
    if not isinstance(pin, bool):
        raise WireError("pin must be a boolean")
    return ClientConfig(
        layout=layout, param_layout=param_layout, compressor=compressor, cv_rate=cv_rate,
        batch_size=None if batch_size == -1 else batch_size, local_steps=local_steps,
        dtype=np.dtype(dtype), pin=pin,
    )


# --------------------------------------------------------------------------
# Client state
# --------------------------------------------------------------------------
def encode_state(state):
    """A :class:`ClientState` as (config, arrays); the stream's big ints as strings."""
    cfg, arrays = ConfigRecord(), ArrayRecord()
    bg = state.rng.bit_generator
    st = bg.state
    if st.get("bit_generator") != "PCG64":
        raise TypeError(f"client streams must be PCG64, got {st.get('bit_generator')!r}")
    cfg["rng.bit_generator"] = "PCG64"
    cfg["rng.state"] = str(int(st["state"]["state"]))
    cfg["rng.inc"] = str(int(st["state"]["inc"]))
    cfg["rng.has_uint32"] = int(st["has_uint32"])
    cfg["rng.uinteger"] = int(st["uinteger"])
    if state.cv is not None:
        arrays["cv"] = Array(np.ascontiguousarray(state.cv))
    if state.log_scale is not None:
        arrays["log_scale"] = Array(np.ascontiguousarray(state.log_scale))
    cache = state.cache.cache if isinstance(state.cache, Unverified) else state.cache
    for name, value in (cache or {}).items():  # (kept on the node only)
        arrays[f"cache.{name}"] = Array(np.ascontiguousarray(value))
    return cfg, arrays


def decode_state(cfg, arrays, size=None, dtype=None):
    """Rebuild a :class:`ClientState`; check the control variate's shape and dtype."""
    if cfg.get("rng.bit_generator") != "PCG64":
        raise WireError("the client stream is not a PCG64 state")
    try:
        state_int, inc = int(cfg["rng.state"]), int(cfg["rng.inc"])
        has_uint32, uinteger = int(cfg["rng.has_uint32"]), int(cfg["rng.uinteger"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"the client stream is incomplete ({exc})") from exc
    if not (0 <= state_int < 2**128 and 0 <= inc < 2**128 and has_uint32 in (0, 1)
            and 0 <= uinteger < 2**32):
        raise WireError("the client stream's state is out of range")
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64", "state": {"state": state_int, "inc": inc},
        "has_uint32": has_uint32, "uinteger": uinteger,
    }
    cache = {
        name[len("cache."):]: _array(arrays, name) for name in arrays.keys()
        if name.startswith("cache.")
    } or None
    unknown = {name for name in arrays.keys() if not name.startswith("cache.")} - {"cv", "log_scale"}
    if unknown:
        raise WireError(f"unexpected arrays in the client state: {sorted(unknown)}")
    cv = _array(arrays, "cv") if "cv" in arrays else None
    log_scale = _array(arrays, "log_scale") if "log_scale" in arrays else None
    for name, value in (("cv", cv), ("log_scale", log_scale)):
        if value is not None and size is not None and value.shape != (size,):
            raise WireError(f"the client state's {name} has shape {value.shape}, expected ({size},)")
    if cv is not None and dtype is not None and cv.dtype != dtype:
        raise WireError(f"the client state's cv has dtype {cv.dtype}, expected {dtype}")
    # a cache is checked against the node's rows before use
    return ClientState(cv=cv, rng=rng, log_scale=log_scale,
                       cache=None if cache is None else Unverified(cache))


# --------------------------------------------------------------------------
# Parameters and statistics
# --------------------------------------------------------------------------
def _encode_param(theta, arrays, prefix):
    if isinstance(theta, dict):
        for k, v in theta.items():
            arrays[f"{prefix}.{k}"] = Array(np.ascontiguousarray(v))
        return True
    arrays[prefix] = Array(np.ascontiguousarray(theta))
    return False


def _decode_param(arrays, prefix, is_dict, dtype):
    if is_dict:
        keys = [k for k in arrays.keys() if k.startswith(prefix + ".")]
        if not keys:
            raise WireError(f"{prefix!r} is missing")
        out = {k[len(prefix) + 1:]: _array(arrays, k) for k in keys}
        values = out.values()
    else:
        if prefix not in arrays:
            raise WireError(f"{prefix!r} is missing")
        out = _array(arrays, prefix)
        values = [out]
    for v in values:
        if v.dtype != dtype:
            raise WireError(f"{prefix!r} has dtype {v.dtype}, expected {dtype}")
    return out


def _vector(arrays, key, size, dtype):
    if key not in arrays:
        raise WireError(f"{key!r} is missing")
    v = _array(arrays, key)
    if v.shape != (size,):
        raise WireError(f"{key!r} has shape {v.shape}, expected ({size},)")
    if v.dtype != dtype:
        raise WireError(f"{key!r} has dtype {v.dtype}, expected {dtype}")
    return v


# --------------------------------------------------------------------------
# Requests (server -> node)
# --------------------------------------------------------------------------
def encode_request(task, *, fit_id, args=(), problem=None, problem_digest=None,
                   state=None, version=None, seed=None):
    """A request to a node as a RecordDict.

    Parameters
    ----------
    task : str
        One of :data:`TASKS`.
    fit_id : str
        Identifies the fit (the node keeps the states of one fit).
    args : tuple
        The task's payload, as the round loop passes it to the transport
        (``(pin,)``, ``(theta, pin)``, ``(theta, s_hat, log_scale, cfg)``
        or ``(theta, cfg)``).
    problem : (ConfigRecord, ArrayRecord), default=None
        The encoded problem, when the node does not hold it yet.
    problem_digest : str, default=None
        The digest of the encoded problem (always sent with a task that
        needs a problem).
    state : ClientState, default=None
        The client's state in full, when the node does not hold it (the
        first round of a fit).
    version : int, default=None
        The version of the client's state the server resumes from (the
        number of rounds of this client the server has committed).
    seed : int, default=None
        The seed of the client's compression stream (``"init_compressed"``,
        ``"full_compressed"``).

    Returns
    -------
    content : RecordDict
    """
    meta = ConfigRecord({"protocol": PROTOCOL, "task": task, "fit_id": fit_id})
    out = RecordDict({"meta": meta})
    arrays = ArrayRecord()
    if task == "info":
        return out
    meta["problem_digest"] = problem_digest
    if problem is not None:
        out["problem.cfg"], out["problem.arrays"] = problem
    if task == "init":
        (pin,) = args
        meta["pin"] = bool(pin)
    elif task in _COMPRESSED_INIT:
        if task == "init_compressed":
            pin, compressor = args[:2]
        else:
            theta, pin, compressor = args[:3]
            meta["theta.is_dict"] = _encode_param(theta, arrays, "theta")
        meta["pin"] = bool(pin)
        if not isinstance(seed, Integral) or not 0 <= seed < 2**63:
            raise ValueError(f"a compressed initialization needs a seed in [0, 2**63), got {seed!r}")
        meta["seed"] = int(seed)
        config = ConfigRecord()
        _encode_compressor(compressor, config)
        out["config"] = config
    elif task in ("full", "loss"):
        theta, pin = args
        meta["pin"] = bool(pin)
        meta["theta.is_dict"] = _encode_param(theta, arrays, "theta")
    elif task in ("surrogate", "parameter"):
        if task == "surrogate":
            theta, s_hat, log_scale, cfg = args
            arrays["s_hat"] = Array(np.ascontiguousarray(s_hat))
            if log_scale is not None:
                arrays["log_scale"] = Array(np.ascontiguousarray(log_scale))
        else:
            theta, cfg = args
        _encode_param(theta, arrays, "theta")
        out["config"] = encode_config(cfg)
        meta["version"] = int(version)
        if state is not None:
            out["state.cfg"], out["state.arrays"] = encode_state(state)
    else:
        raise ValueError(f"unknown task {task!r}")
    out["arrays"] = arrays
    return out


def _records(content, allowed):
    unknown = set(content.keys()) - set(allowed)
    if unknown:
        raise WireError(f"unexpected records {sorted(unknown)}")


def _config(content, key):
    if key not in content:
        raise WireError(f"the record {key!r} is missing")
    rec = content[key]
    if not isinstance(rec, ConfigRecord):
        raise WireError(f"{key!r} is not a ConfigRecord")
    return rec


def _arrays(content, key, required=True):
    if key not in content:
        if required:
            raise WireError(f"the record {key!r} is missing")
        return ArrayRecord()
    rec = content[key]
    if not isinstance(rec, ArrayRecord):
        raise WireError(f"{key!r} is not an ArrayRecord")
    return rec


def decode_meta(content):
    """The request's task, fit id and header, checked (protocol, task)."""
    if not isinstance(content, RecordDict):
        raise WireError("the content is not a RecordDict")
    meta = _config(content, "meta")
    if meta.get("protocol") != PROTOCOL:
        raise WireError(f"protocol {meta.get('protocol')!r}, expected {PROTOCOL!r}")
    if meta.get("task") not in TASKS:
        raise WireError(f"unknown task {meta.get('task')!r}")
    if not isinstance(meta.get("fit_id"), str):
        raise WireError("the fit id is missing")
    return meta


def decode_request(content, dtype):
    """Check a request and return its parts (run on the node, before anything else).

    Parameters
    ----------
    content : RecordDict
    dtype : numpy.dtype
        The dtype of the node's rows (every array must have it).

    Returns
    -------
    request : dict
        ``task``, ``fit_id``, ``problem`` (records or None),
        ``problem_digest``, ``args`` (the task's payload), ``state`` (a
        ClientState or None) and ``version``.

    Raises
    ------
    WireError
    """
    meta = decode_meta(content)
    task = meta["task"]
    dtype = np.dtype(dtype)
    _records(content, ["meta", "problem.cfg", "problem.arrays", "arrays", "config",
                       "state.cfg", "state.arrays"])
    out = dict(task=task, fit_id=meta["fit_id"], problem=None, problem_digest=None,
               args=(), state=None, version=None)
    if task == "info":
        return out
    digest = meta.get("problem_digest")
    if not isinstance(digest, str):
        raise WireError("the problem digest is missing")
    out["problem_digest"] = digest
    if "problem.cfg" in content:
        records = (_config(content, "problem.cfg"), _arrays(content, "problem.arrays"))
        if records_digest(*records) != digest:
            raise WireError("the problem does not match its digest")
        out["problem"] = records
    arrays = _arrays(content, "arrays")
    if task in _COMPRESSED_INIT:
        pin, seed = meta.get("pin"), meta.get("seed")
        if not isinstance(pin, bool):
            raise WireError("pin must be a boolean")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise WireError(f"the seed must be an int in [0, 2**63), got {seed!r}")
        compressor = _decode_compressor(_config(content, "config"))
        if task == "init_compressed":
            out["args"] = (pin, compressor, seed)
        else:
            is_dict = meta.get("theta.is_dict")
            if not isinstance(is_dict, bool):
                raise WireError("theta.is_dict must be a boolean")
            out["args"] = (_decode_param(arrays, "theta", is_dict, dtype), pin, compressor, seed)
        return out
    if task in ("init", "full", "loss"):
        pin = meta.get("pin")
        if not isinstance(pin, bool):
            raise WireError("pin must be a boolean")
        if task == "init":
            out["args"] = (pin,)
        else:
            is_dict = meta.get("theta.is_dict")
            if not isinstance(is_dict, bool):
                raise WireError("theta.is_dict must be a boolean")
            out["args"] = (_decode_param(arrays, "theta", is_dict, dtype), pin)
        return out
    cfg = decode_config(_config(content, "config"))
    if cfg.dtype != dtype:
        raise WireError(f"the fit's dtype is {cfg.dtype}, the node's rows are {dtype}")
    theta = _decode_param(arrays, "theta", cfg.param_layout.is_dict, dtype)
    try:
        cfg.param_layout.flatten(theta, dtype)
    except InvalidMessageError as exc:
        raise WireError(f"theta does not match its layout: {exc}") from exc
    version = meta.get("version")
    if not isinstance(version, int) or version < 0:
        raise WireError(f"the state version must be a nonnegative int, got {version!r}")
    out["version"] = version
    size = cfg.layout.size
    if task == "surrogate":
        s_hat = _vector(arrays, "s_hat", size, dtype)
        log_scale = _vector(arrays, "log_scale", size, np.dtype(np.float64)) \
            if "log_scale" in arrays else None
        out["args"] = (theta, s_hat, log_scale, cfg)
    else:
        out["args"] = (theta, cfg)
    if "state.cfg" in content:
        state = decode_state(
            _config(content, "state.cfg"), _arrays(content, "state.arrays"),
            size=size, dtype=dtype,
        )
        if task == "surrogate" and state.cv is None:
            raise WireError("the client state has no control variate")
        out["state"] = state
    return out


# --------------------------------------------------------------------------
# Compressed payloads: the compressor's own encoding, bit-packed
# --------------------------------------------------------------------------
class RecordingCompressor:
    """Wraps a compressor on the node and keeps what its encoding needs.

    QSGD's message is one norm per bucket, one sign bit and a level per
    entry; the norms are not recoverable from the dequantized payload, so
    the node records them as it compresses.
    """

    def __init__(self, compressor):
        self.compressor = compressor
        self.norm = None
        self.norms = []  # one entry per compressed message, in order

    def omega(self, d):
        return self.compressor.omega(d)

    def compress(self, x, rng):
        from ..compression import QSGD

        if isinstance(self.compressor, QSGD):
            self.norm = self.compressor.bucket_norms(x)  # the very values QSGD uses
        self.norms.append(self.norm)
        return self.compressor.compress(x, rng)


def _uint_bits(values, width):
    """Nonnegative ints as ``width`` bits each, packed (big-endian bits)."""
    values = np.asarray(values, dtype=np.uint64)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.ravel())


def _unpack_uint(packed, n, width):
    bits = np.unpackbits(packed)[: n * width]
    if bits.size != n * width:
        raise WireError("a packed payload is too short")
    weights = np.uint64(1) << np.arange(width - 1, -1, -1, dtype=np.uint64)
    return (bits.reshape(n, width).astype(np.uint64) * weights).sum(axis=1)


def pack_payload(payload, compressor, norm=None):
    r"""The payload in its compressor's encoding: (config, arrays).

    ``"qsgd"``: one norm per bucket and the code of the signed levels
    (:meth:`~skfedmm.compression.QSGD.encode`); ``"randk"``: the
    ``k`` kept values and their indices (:math:`\lceil \log_2 d \rceil`
    bits each); otherwise (or when the payload does not decode to itself,
    bit for bit) the dense vector. Packed bytes are the compressor's
    reported bits rounded up to whole bytes.
    """
    from ..compression import QSGD, RandK

    payload = np.ascontiguousarray(payload)
    d, dtype = payload.size, payload.dtype
    cfg, arrays = ConfigRecord({"encoding": "dense"}), ArrayRecord()
    try:
        norms = None if norm is None else np.asarray(norm, dtype=dtype).reshape(-1)
        if (isinstance(compressor, QSGD) and norms is not None and np.all(np.isfinite(norms))
                and np.all(norms >= 0) and norms.size == -(-d // compressor._bucket(d))):
            s = int(compressor.s)
            scale = np.repeat(np.where(norms > 0, norms, 1) / s, compressor._bucket(d))[:d]
            q = np.rint(payload / scale)
            if np.all(np.abs(q) <= s) and np.array_equal(q.astype(dtype) * scale, payload):
                code = compressor.encode(q.astype(np.int64))
                cfg["encoding"] = "qsgd"
                cfg["levels_bits"] = int(code.size)
                arrays["norm"] = Array(np.ascontiguousarray(norms))
                arrays["levels"] = Array(np.packbits(code))
                return cfg, arrays
        if isinstance(compressor, RandK) and d > 1:
            k = compressor._k(d)
            keep = np.flatnonzero(payload)
            if 0 < k < d and keep.size <= k:
                # exact zeros among the kept values: any other indices do
                extra = np.setdiff1d(np.arange(d), keep)[: k - keep.size]
                keep = np.sort(np.concatenate([keep, extra]))
                width = max(1, math.ceil(math.log2(d)))
                cfg["encoding"] = "randk"
                arrays["values"] = Array(np.ascontiguousarray(payload[keep]))
                arrays["indices"] = Array(_uint_bits(keep, width))
                return cfg, arrays
    except (ValueError, OverflowError, TypeError):  # pragma: no cover - fall back
        pass
    arrays["payload"] = Array(payload)
    return cfg, arrays


def unpack_payload(cfg, arrays, compressor, size, dtype):
    """The payload from :func:`pack_payload`'s records, checked."""
    from ..compression import QSGD, RandK

    encoding = cfg.get("encoding")
    dtype = np.dtype(dtype)
    if encoding == "dense":
        if set(arrays.keys()) != {"payload"}:
            raise WireError(f"expected the array 'payload' only, got {sorted(arrays.keys())}")
        return _vector(arrays, "payload", size, dtype)
    if encoding == "qsgd" and isinstance(compressor, QSGD):
        if set(arrays.keys()) != {"norm", "levels"}:
            raise WireError(f"expected the arrays 'norm', 'levels', got {sorted(arrays.keys())}")
        bucket = compressor._bucket(size)
        norms = _vector(arrays, "norm", -(-size // bucket), dtype)
        packed = arrays["levels"].numpy()
        if packed.dtype != np.uint8 or packed.ndim != 1:
            raise WireError("the packed levels are not bytes")
        s = int(compressor.s)
        n_bits = cfg.get("levels_bits")
        if isinstance(n_bits, bool) or not isinstance(n_bits, int) or n_bits < 0 \
                or packed.size != math.ceil(n_bits / 8):
            raise WireError(f"{packed.size} bytes of levels for {n_bits!r} bits")
        try:
            levels = compressor.decode(np.unpackbits(packed)[:n_bits], size)
        except ValueError as exc:
            raise WireError(f"the QSGD code cannot be read: {exc}") from exc
        zero = np.repeat(norms == 0, bucket)[:size]
        if np.any(norms < 0) or np.any(levels[zero] != 0):
            raise WireError("a QSGD level or norm is out of range")
        return levels.astype(dtype) * np.repeat(norms / s, bucket)[:size]
    if encoding == "randk" and isinstance(compressor, RandK):
        if set(arrays.keys()) != {"values", "indices"}:
            raise WireError(f"expected the arrays 'values', 'indices', got {sorted(arrays.keys())}")
        k = compressor._k(size)
        values = _vector(arrays, "values", k, dtype)
        packed = arrays["indices"].numpy()
        width = max(1, math.ceil(math.log2(size)))
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != math.ceil(k * width / 8):
            raise WireError("the packed indices have the wrong size")
        keep = _unpack_uint(packed, k, width).astype(np.int64)
        if np.any(keep >= size) or np.unique(keep).size != k:
            raise WireError("RandK indices out of range or repeated")
        out = np.zeros(size, dtype=dtype)
        out[keep] = values
        return out
    raise WireError(f"unknown payload encoding {encoding!r} for this fit's compressor")


# --------------------------------------------------------------------------
# Replies (node -> server)
# --------------------------------------------------------------------------
def _stat_arrays(stat, arrays):
    if not isinstance(stat, dict):
        raise TypeError(f"a statistic must be a dict of arrays, got {type(stat).__name__}")
    for k, v in stat.items():
        arrays[f"stat.{k}"] = Array(np.ascontiguousarray(np.asarray(v)))


def encode_reply(task, answer, *, version=None, compressor=None):
    """A node's answer as a RecordDict.

    Parameters
    ----------
    task : str
    answer : object
        What the task's function returned (``"info"``: a dict with
        ``n_rows``, ``n_features``, ``dtype``); for ``"surrogate"`` and
        ``"parameter"`` only the :class:`ClientMessage` travels (the new
        state stays on the node).
    version : int, default=None
        The version of the node's new (tentative) state.
    compressor : Compressor or RecordingCompressor, default=None
        The fit's compressor: the payload travels in its encoding
        (:func:`pack_payload`); dense when None.

    Returns
    -------
    content : RecordDict
    """
    meta = ConfigRecord({"protocol": PROTOCOL, "task": task})
    arrays = ArrayRecord()
    if task == "info":
        meta["n_rows"] = int(answer["n_rows"])
        meta["n_features"] = int(answer["n_features"])
        meta["dtype"] = str(answer["dtype"])
    elif task == "init":
        meta["none"] = answer is None
        if answer is not None:
            _stat_arrays(answer, arrays)
    elif task in _COMPRESSED_INIT:
        meta["none"] = answer is None
        if answer is not None:
            stat, bits = answer[0], answer[-1]
            _pack_statistic(stat, compressor, meta, arrays)
            meta["bits"] = int(bits)
            if task == "full_compressed":
                meta["loss"] = float(answer[1])
    elif task == "full":
        stat, loss = answer
        _stat_arrays(stat, arrays)
        meta["loss"] = float(loss)
    elif task == "loss":
        meta["loss"] = float(answer)
    else:
        meta["bits"] = int(answer.bits)
        meta["loss"] = float(answer.loss)
        meta["version"] = int(version)
        if compressor is None:
            arrays["payload"] = Array(np.ascontiguousarray(answer.payload))
            meta["encoding"] = "dense"
        else:
            packed_cfg, arrays = pack_payload(
                answer.payload, getattr(compressor, "compressor", compressor),
                getattr(compressor, "norm", None),
            )
            for key, value in packed_cfg.items():
                meta[key] = value
    return RecordDict({"meta": meta, "arrays": arrays})


def _pack_statistic(stat, compressor, meta, arrays):
    """A compressed statistic, each array in its compressor's encoding.

    ``compressor`` is the :class:`RecordingCompressor` the statistic was
    compressed with (one message per array, in the statistic's order).
    """
    if not isinstance(stat, dict):
        raise TypeError(f"a statistic must be a dict of arrays, got {type(stat).__name__}")
    norms = list(getattr(compressor, "norms", [])) or [None] * len(stat)
    inner = getattr(compressor, "compressor", compressor)
    meta["stat.names"] = list(stat)
    for (name, value), norm in zip(stat.items(), norms):
        value = np.asarray(value)
        packed_cfg, packed = pack_payload(value.reshape(-1), inner, norm)
        meta[f"stat.{name}.shape"] = [int(n) for n in value.shape]
        meta[f"stat.{name}.dtype"] = value.dtype.name
        for key, item in packed_cfg.items():
            meta[f"stat.{name}.{key}"] = item
        for key in packed.keys():
            arrays[f"stat.{name}.{key}"] = packed[key]


def _unpack_statistic(meta, arrays, compressor):
    """The statistic of :func:`_pack_statistic`, checked."""
    names = meta.get("stat.names")
    if not isinstance(names, list) or not names or len(set(names)) != len(names) or not all(
            isinstance(n, str) for n in names):
        raise WireError("the statistic's names are missing or repeated")
    out, used = {}, set()
    for name in names:
        prefix = f"stat.{name}."
        shape, dtype = meta.get(prefix + "shape"), meta.get(prefix + "dtype")
        if not isinstance(shape, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise WireError(f"the shape of {name!r} is missing")
        if dtype not in _FLOATS:
            raise WireError(f"{name!r} has dtype {dtype!r}, expected float32 or float64")
        cfg = {key[len(prefix):]: value for key, value in meta.items() if key.startswith(prefix)}
        sub = ArrayRecord()
        for key in arrays.keys():
            if key.startswith(prefix):
                sub[key[len(prefix):]] = arrays[key]
                used.add(key)
        size = int(np.prod(shape)) if shape else 1
        out[name] = unpack_payload(cfg, sub, compressor, size, dtype).reshape(shape)
    if used != set(arrays.keys()):
        raise WireError("unexpected arrays in a statistic")
    return out


def encode_error(task, error, message):
    """A node's refusal or failure (a malformed request, a failed task)."""
    return RecordDict({"meta": ConfigRecord({
        "protocol": PROTOCOL, "task": task, "error": str(error), "message": str(message),
    })})


def _loss(meta):
    loss = meta.get("loss")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)):
        raise WireError(f"the loss is not a number ({loss!r})")
    if not math.isfinite(loss):
        raise WireError("the loss is not finite")
    return float(loss)


def decode_reply(content, task, *, dtype=None, size=None, compressor=None):
    """Check a node's reply and return the task's answer (run on the server).

    Parameters
    ----------
    content : RecordDict
    task : str
        The task that was asked.
    dtype : numpy.dtype, default=None
        The dtype of the fit (every array must have it).
    size : int, default=None
        The length of a surrogate/parameter payload.
    compressor : Compressor, default=None
        The fit's compressor (to decode a packed payload).

    Returns
    -------
    answer : object
        As the task's function returns it; for ``"surrogate"`` and
        ``"parameter"`` a ``(ClientMessage, version)`` pair.

    Raises
    ------
    WireError
        A malformed reply, or a node that reports an error (its type and
        message in the error's text).
    """
    if not isinstance(content, RecordDict):
        raise WireError("the content is not a RecordDict")
    _records(content, ["meta", "arrays"])
    meta = _config(content, "meta")
    if meta.get("protocol") != PROTOCOL:
        raise WireError(f"protocol {meta.get('protocol')!r}, expected {PROTOCOL!r}")
    if meta.get("task") != task:
        raise WireError(f"a reply to {meta.get('task')!r}, expected one to {task!r}")
    if "error" in meta:
        raise NodeError(str(meta["error"]), str(meta.get("message", "")))
    arrays = _arrays(content, "arrays")
    dtype = None if dtype is None else np.dtype(dtype)

    def stat():
        keys = [k for k in arrays.keys() if k.startswith("stat.")]
        if len(keys) != len(arrays.keys()):
            raise WireError("unexpected arrays in a statistic")
        out = {}
        for k in keys:
            v = _array(arrays, k)
            if dtype is not None and v.dtype.kind == "f" and v.dtype != dtype:
                raise WireError(f"{k!r} has dtype {v.dtype}, expected {dtype}")
            out[k[5:]] = v
        if not out:
            raise WireError("the statistic is empty")
        return out

    if task == "info":
        n_rows, n_features, dt = meta.get("n_rows"), meta.get("n_features"), meta.get("dtype")
        if not isinstance(n_rows, int) or n_rows < 1:
            raise WireError(f"n_rows must be a positive int, got {n_rows!r}")
        if not isinstance(n_features, int) or n_features < 1:
            raise WireError(f"n_features must be a positive int, got {n_features!r}")
        if dt not in _FLOATS:
            raise WireError(f"the rows' dtype {dt!r} is not float32 or float64")
        return {"n_rows": n_rows, "n_features": n_features, "dtype": np.dtype(dt)}
    if task == "init":
        if not isinstance(meta.get("none"), bool):
            raise WireError("'none' must be a boolean")
        if meta["none"]:
            if len(arrays.keys()):
                raise WireError("an empty init statistic with arrays")
            return None
        return stat()
    if task == "full":
        return stat(), _loss(meta)
    if task == "loss":
        return _loss(meta)
    if task in _COMPRESSED_INIT:
        if not isinstance(meta.get("none"), bool):
            raise WireError("'none' must be a boolean")
        if meta["none"]:
            if task == "full_compressed" or len(arrays.keys()):
                raise WireError("an empty compressed statistic")
            return None
        bits = meta.get("bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 0:
            raise WireError(f"bits must be a nonnegative int, got {bits!r}")
        if compressor is None:
            raise ValueError("decoding a compressed statistic needs the fit's compressor")
        stat = _unpack_statistic(meta, arrays, compressor)
        for name, value in stat.items():
            if dtype is not None and value.dtype != dtype:
                raise WireError(f"'stat.{name}' has dtype {value.dtype}, expected {dtype}")
        if not all(np.all(np.isfinite(v)) for v in stat.values()):
            raise WireError("the statistic is not finite")
        if task == "init_compressed":
            return stat, bits
        return stat, _loss(meta), bits
    bits, version = meta.get("bits"), meta.get("version")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits < 0:
        raise WireError(f"bits must be a nonnegative int, got {bits!r}")
    if not isinstance(version, int) or version < 1:
        raise WireError(f"the state version must be a positive int, got {version!r}")
    if size is None or dtype is None:
        raise ValueError("decoding a payload needs its size and dtype")
    payload = unpack_payload(meta, arrays, compressor, size, dtype)
    if not np.all(np.isfinite(payload)):
        raise WireError("the payload is not finite")
    return ClientMessage(payload=payload, bits=bits, loss=_loss(meta)), version


class NodeError(Exception):
    """A node reported that it could not run a task (its error type and message)."""

    def __init__(self, error, message):
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message


def check_compressor(compressor):
    """Raise unless ``compressor`` can travel by name (skfedmm's compressors)."""
    if not isinstance(compressor, Compressor):
        raise TypeError(f"not a Compressor: {compressor!r}")
    _compressor_name(compressor)
