"""The node's side: a Flower ``ClientApp`` running skfedmm's client tasks.

A node loads its rows with the user's ``load_rows(context)`` (from its node
configuration, for example a file path); the rows never leave it. Every
request is checked (:func:`~skfedmm.flower.records.decode_request`) before
anything runs, and only the task's answer is sent back: the node's control
variate and random stream stay in its persistent state (``context.state``).

**Atomicity.** The server commits a round only when all of it succeeded, so
the node keeps two states of the current fit: the *committed* one (the one
the server resumes from) and the *tentative* one that its last answer
produced. Each state has a version (the number of this client's rounds the
server has committed). A request names the version the server resumes
from: the tentative state's version means the server committed that round
(the tentative state becomes the committed one); the committed state's
version means it did not (the tentative state is dropped). A request of a
new fit carries the client's initial state in full.
"""

import dataclasses

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from ..federation.client import CLIENT_TASKS
from .records import (
    RecordingCompressor,
    WireError,
    decode_problem,
    decode_request,
    decode_state,
    encode_error,
    encode_reply,
    encode_state,
)

__all__ = ["handle", "make_client_app"]

_PREFIX = "skfedmm."


def _get(store, key):
    return store[_PREFIX + key] if _PREFIX + key in store else None


def _put(store, key, record):
    store[_PREFIX + key] = record


def _drop(store, key):
    if _PREFIX + key in store:
        del store[_PREFIX + key]


def _load_state(store, which, size, dtype):
    meta = _get(store, f"{which}.meta")
    if meta is None:
        return None, None
    state = decode_state(_get(store, f"{which}.cfg"), _get(store, f"{which}.arrays"), size, dtype)
    return int(meta["version"]), state


def _save_state(store, which, version, state):
    cfg, arrays = encode_state(state)
    _put(store, f"{which}.cfg", cfg)
    _put(store, f"{which}.arrays", arrays)
    _put(store, f"{which}.meta", ConfigRecord({"version": int(version)}))


def _drop_state(store, which):
    for part in ("meta", "cfg", "arrays"):
        _drop(store, f"{which}.{part}")


def _problem(store, request):
    """The request's problem: sent with it (then kept), or the one the node holds."""
    if request["problem"] is not None:
        cfg, arrays = request["problem"]
        problem = decode_problem(cfg, arrays)
        _put(store, "problem.cfg", cfg)
        _put(store, "problem.arrays", arrays)
        _put(store, "problem.meta", ConfigRecord({"digest": request["problem_digest"]}))
        return problem
    meta = _get(store, "problem.meta")
    if meta is None or meta["digest"] != request["problem_digest"]:
        raise WireError("this node does not hold the problem of the request (send it again)")
    return decode_problem(_get(store, "problem.cfg"), _get(store, "problem.arrays"))


def _base_state(store, request, size, dtype):
    """The state to run from (see the module's notes on atomicity)."""
    fit = _get(store, "fit")
    version = request["version"]
    if request["state"] is not None:
        # a new fit, or a client the server holds the state of: start over
        _drop_state(store, "tentative")
        _save_state(store, "committed", version, request["state"])
        _put(store, "fit", ConfigRecord({"fit_id": request["fit_id"]}))
        return request["state"]
    if fit is None or fit["fit_id"] != request["fit_id"]:
        raise WireError(f"this node holds no state of fit {request['fit_id']!r}")
    tentative = _load_state(store, "tentative", size, dtype)
    committed = _load_state(store, "committed", size, dtype)
    if tentative[0] == version:
        # the server committed the round of the tentative state
        _save_state(store, "committed", *tentative)
        _drop_state(store, "tentative")
        return tentative[1]
    if committed[0] == version:
        _drop_state(store, "tentative")  # that round was not committed
        return committed[1]
    held = [v for v, _ in (committed, tentative) if v is not None]
    raise WireError(
        f"the server resumes from state version {version}, this node holds versions {held}"
    )


def handle(content, store, rows, client_init=None):
    """Run one request on a node; the node's part of :class:`FlowerTransport`.

    Parameters
    ----------
    content : RecordDict
        The request.
    store : RecordDict
        The node's persistent state (``context.state``), updated in place
        only when the request was valid.
    rows : ndarray of shape (n_rows, n_features)
        The node's rows.
    client_init : object, default=None
        The node's initialization data for :meth:`MMProblem.init_statistic`
        (for example initial codes), which stays on the node.

    Returns
    -------
    reply : RecordDict
        The answer, or an error record (type and message) when the request
        was malformed or the task failed; the state is then unchanged.
    """
    task = "?"
    try:
        meta = content["meta"] if isinstance(content, RecordDict) and "meta" in content else {}
        task = str(meta.get("task", "?")) if isinstance(meta, ConfigRecord) else "?"
        request = decode_request(content, rows.dtype)
        task = request["task"]
        if task == "info":
            return encode_reply("info", {
                "n_rows": rows.shape[0], "n_features": rows.shape[1], "dtype": rows.dtype.name,
            })
        problem = _problem(store, request)
        fn = CLIENT_TASKS[task]
        if task == "init":
            (pin,) = request["args"]
            answer = fn(problem, rows, pin) if client_init is None else fn(problem, rows, pin, client_init)
            return encode_reply(task, answer)
        if task in ("init_compressed", "full_compressed"):
            # the compressor's own encoding travels (QSGD needs its norms)
            *args, compressor, seed = request["args"]
            compressor = RecordingCompressor(compressor)
            if task == "init_compressed":
                answer = fn(problem, rows, *args, compressor, (seed, client_init))
            else:
                answer = fn(problem, rows, *args, compressor, seed)
            return encode_reply(task, answer, compressor=compressor)
        if task in ("full", "loss"):
            return encode_reply(task, fn(problem, rows, *request["args"]))
        cfg = request["args"][-1]
        # the compressor's own encoding travels (QSGD needs the norm it used)
        compressor = RecordingCompressor(cfg.compressor)
        args = request["args"][:-1] + (dataclasses.replace(cfg, compressor=compressor),)
        # checked against the fit, then the task runs; the store changes only at the end
        trial = RecordDict(dict(store.items()))
        state = _base_state(trial, request, cfg.layout.size, cfg.dtype)
        message, new_state = fn(problem, rows, state, *args)
        version = request["version"] + 1
        _save_state(trial, "tentative", version, new_state)
        reply = encode_reply(task, message, version=version, compressor=compressor)
        for key in list(store.keys()):
            if key not in trial:
                del store[key]
        for key, value in trial.items():
            store[key] = value
        return reply
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the server
        return encode_error(task, type(exc).__name__, str(exc))


def _rows(load_rows, context):
    rows = load_rows(context)
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.dtype not in (np.float32, np.float64):
        raise ValueError(
            "load_rows must return a non-empty 2-D float32 or float64 array, got "
            f"{rows.dtype} of shape {rows.shape}"
        )
    if not np.all(np.isfinite(rows)):
        raise ValueError("load_rows returned NaN or infinite values")
    return np.ascontiguousarray(rows)


def make_client_app(load_rows, load_init=None):
    """A Flower ``ClientApp`` running skfedmm's client tasks on the node's rows.

    Parameters
    ----------
    load_rows : callable
        ``load_rows(context) -> ndarray of shape (n_rows, n_features)``:
        the node's rows, typically read from a path in
        ``context.node_config``. They never leave the node.
    load_init : callable, default=None
        ``load_init(context)``: the node's initialization data (for example
        a dictionary fit's initial codes), passed to the problem's
        ``init_statistic``; it never leaves the node.

    Returns
    -------
    app : flwr.clientapp.ClientApp
        Answers messages of type ``"query.skfedmm"``.
    """
    from flwr.app import Message
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query("skfedmm")
    def _query(msg, context):
        rows = _rows(load_rows, context)
        init = None if load_init is None else load_init(context)
        reply = handle(msg.content, context.state, rows, init)
        return Message(reply, reply_to=msg)

    return app

