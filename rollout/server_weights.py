"""The weight-update side of `opd rollout-server`, as SGLang 0.5.23's engine does it (CPU: gloo).

Routes: /init_weights_update_group, /update_weights_from_distributed, /destroy_weights_update_group,
/begin_weight_update, /end_weight_update, /update_weights_from_disk, /update_weights_from_tensor.
Read from SGLang's source (entrypoints/http_server.py, managers/io_struct.py,
managers/scheduler_components/weight_updater.py, model_executor/.../weight_updater.py):

- Request bodies: the fields and defaults of SGLang's request classes (REQUESTS below); a missing
  required field or a value of the wrong JSON type is a 400, unknown fields are dropped, as there.
- /init_weights_update_group joins rank `rank_offset + tp_rank` (tp_rank 0 here) of a group
  rendezvoused over tcp://master_address:master_port with the store prefixed by group_name
  (rollout.weight_sync.open_group builds it with SGLang's store layout). The reply comes after the
  rendezvous. A group name already in use is success: false.
- /update_weights_from_distributed outside a begin/end session is success: false before anything
  is received. In a session: one broadcast from rank 0 per name, in list order, into new tensors of
  the given dtype and shape, then loaded into the model; `weight_version` (if given) becomes the
  version every /generate reports in meta_info.weight_version.
- A second begin without an end, or an end without a begin, is success: false.
- Replies: {"success", "message"}, 200 on success and 400 on failure.

`fail_updates` (a test hook) makes the next N weight updates answer what SGLang answers when the
weights were loaded but the cache could not be flushed under load: success: false.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

import torch

REQUESTS = {  # field -> (JSON type, default; REQUIRED if none), from io_struct.py
    "/init_weights_update_group": {"master_address": (str, ...), "master_port": (int, ...),
                                   "rank_offset": (int, ...), "world_size": (int, ...),
                                   "group_name": (str, "weight_update_group"), "backend": (str, "nccl")},
    "/update_weights_from_distributed": {"names": (list, ...), "dtypes": (list, ...), "shapes": (list, ...),
                                         "group_name": (str, "weight_update_group"), "flush_cache": (bool, True),
                                         "abort_all_requests": (bool, False), "weight_version": ((str, None), None),
                                         "load_format": ((str, None), None), "selector": (str, "all"),
                                         "torch_empty_cache": (bool, False)},
    "/destroy_weights_update_group": {"group_name": (str, "weight_update_group")},
    "/begin_weight_update": {"selector": (str, "all")},
    "/end_weight_update": {},
    "/update_weights_from_disk": {"model_path": (str, ...), "load_format": ((str, None), None),
                                  "abort_all_requests": (bool, False), "weight_version": ((str, None), None),
                                  "is_async": (bool, False), "torch_empty_cache": (bool, False),
                                  "keep_pause": (bool, False), "recapture_cuda_graph": (bool, False),
                                  "token_step": (int, 0), "flush_cache": (bool, True),
                                  "manifest": ((dict, None), None)},
    "/update_weights_from_tensor": {"serialized_named_tensors": (list, ...), "load_format": ((str, None), None),
                                    "flush_cache": (bool, True), "abort_all_requests": (bool, False),
                                    "weight_version": ((str, None), None), "selector": (str, "all"),
                                    "torch_empty_cache": (bool, False)},
}
WEIGHT_ROUTES = frozenset(REQUESTS)
SELECTORS = ("target", "draft", "all")
NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or "
               "queued. Retract or finish them, then call /flush_cache.")


class BadRequest(ValueError):
    pass


def parse_request(path: str, body: dict) -> dict:
    """SGLang's request class for `path` built from a JSON body: defaults filled in, types checked."""
    out = {}
    for name, (typ, default) in REQUESTS[path].items():
        if name not in body:
            if default is ...:
                raise BadRequest(f"{path}: field `{name}` is required")
            out[name] = default
            continue
        v = body[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        ok = any((v is None) if t is None else (isinstance(v, t) and not (t is int and isinstance(v, bool)))
                 for t in types)
        if not ok:
            expected = " or ".join("null" if t is None else t.__name__ for t in types)
            raise BadRequest(f"{path}: field `{name}` expected {expected}, got {type(v).__name__}")
        out[name] = v
    if "selector" in out and out["selector"] not in SELECTORS:
        raise BadRequest(f"{path}: selector {out['selector']!r} is not one of {', '.join(SELECTORS)}")
    return out


class WeightUpdates:
    """Mixed into RolloutService: needs self.engine (LocalEngine), self.paused, self._set_version."""

    def _init_weight_updates(self) -> None:
        self._wlock = threading.Lock()  # one weight call at a time, as SGLang's scheduler runs them
        self._session: str | None = None
        self._groups: dict[str, object] = {}
        self.fail_updates = 0
        self.weight_calls: collections.Counter = collections.Counter()  # path -> calls (tests)
        self.released: set[str] = set()  # memory tags released and not resumed
        self.memory_log: list = []

    def memory_route(self, path: str, body: dict) -> tuple[int, object]:
        """/release_memory_occupation, /resume_memory_occupation (tags checked by the caller). As
        SGLang without --enable-weights-cpu-backup: released weights lose their contents (here: NaN)
        until weights are pushed again; release needs an idle server."""
        tags = set(body.get("tags") or ("weights", "kv_cache", "cuda_graph"))
        self.weight_calls[path] += 1
        self.memory_log.append((path, sorted(tags)))
        if path == "/resume_memory_occupation":
            self.released -= tags
            return 200, None
        if not self.paused and self.engine.num_unfinished():
            return 400, {"error": {"message": "release_memory_occupation should be called only when server is idle."}}
        if "weights" in tags and "weights" not in self.released:
            self.engine.load_state_dict_({k: torch.full_like(v, float("nan"))
                                          for k, v in self.engine.model.state_dict().items()})
        self.released |= tags
        return 200, None

    def weight_route(self, path: str, body: dict) -> tuple[int, dict]:
        try:
            req = parse_request(path, body)
        except BadRequest as e:  # SGLang's request-validation reply
            return 400, {"object": "error", "message": str(e), "type": "Bad Request", "param": None, "code": 400}
        self.weight_calls[path] += 1
        if path == "/init_weights_update_group":  # not under _wlock: it waits for the other ranks
            ok, msg = self._init_group(req)
        else:
            with self._wlock:
                ok, msg = getattr(self, "_w_" + path.strip("/"))(req)
        reply = {"success": ok, "message": msg}
        if path == "/update_weights_from_disk":
            reply["num_paused_requests"] = 0
        return (200 if ok else 400), reply

    # ---- group ---------------------------------------------------------------------------------
    def _init_group(self, req) -> tuple[bool, str]:
        from rollout.weight_sync import open_group

        name = req["group_name"]
        if not name:
            return False, "Failed to initialize custom process group: Group name cannot be empty."
        if name in self._groups:
            return False, ("Failed to initialize custom process group: The specified group name has already been "
                           "created, please use a different group name.")
        try:  # an address that does not resolve fails now, not after the rendezvous timeout
            socket.getaddrinfo(req["master_address"], req["master_port"])
        except OSError as e:
            return False, f"Failed to initialize custom process group: {req['master_address']!r}: {e}."
        if req["backend"] == "nccl" and not torch.cuda.is_available():
            return False, ("Failed to initialize custom process group: backend nccl needs CUDA; this server runs on "
                           "CPU (use gloo).")
        try:
            pg = open_group(req["master_address"], req["master_port"], req["rank_offset"] + 0, req["world_size"],
                            name, req["backend"], timeout_s=getattr(self, "group_timeout_s", 600.0))
        except Exception as e:
            return False, f"Failed to initialize custom process group: {e}."
        self._groups[name] = pg
        return True, "Succeeded to initialize custom process group."

    def _w_destroy_weights_update_group(self, req) -> tuple[bool, str]:
        from rollout.weight_sync import close_group

        pg = self._groups.pop(req["group_name"], None)
        if pg is None:
            return False, "The group to be destroyed does not exist."
        close_group(pg)
        return True, "Succeeded to destroy custom process group."

    # ---- session -------------------------------------------------------------------------------
    def _w_begin_weight_update(self, req) -> tuple[bool, str]:
        if self._session is not None:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self._session = req["selector"]
        return True, "Success"

    def _w_end_weight_update(self, req) -> tuple[bool, str]:
        if self._session is None:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self._session = None
        return True, "Success"

    # ---- loads ---------------------------------------------------------------------------------
    def _finish_update(self, req, ok: bool, msg: str) -> tuple[bool, str]:
        """After a load: record the version, then the flush (or the injected under-load failure)."""
        if not ok:
            return ok, msg
        if self.fail_updates > 0:  # the version moves only with a successful reply, as in SGLang
            self.fail_updates -= 1
            if req["flush_cache"]:
                return False, NOT_FLUSHED
            return False, "Failed to update parameter online: injected failure (opd rollout-server fail_updates)."
        self._set_version(req["weight_version"])
        if req["weight_version"] is not None:
            msg += f" Weight version updated to {req['weight_version']}."
        return True, msg

    def _wait_idle(self, timeout_s: float = 600.0) -> None:
        """Not paused: SGLang's writer lock lets the requests in flight finish first."""
        if self.paused:
            return
        deadline = time.time() + timeout_s
        while self.engine.num_unfinished() and time.time() < deadline:
            time.sleep(0.005)

    def _w_update_weights_from_distributed(self, req) -> tuple[bool, str]:
        from rollout.weight_sync import broadcast

        if self._session is None:
            return False, ("update_weights_from_distributed must run between begin_weight_update() and "
                           "end_weight_update()")
        names, dtypes, shapes = req["names"], req["dtypes"], req["shapes"]
        try:
            if not (len(names) == len(dtypes) == len(shapes)):
                raise ValueError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ "
                                 "in length")
            if req["group_name"] not in self._groups:
                raise AssertionError(f"Group {req['group_name']} not in {list(self._groups)}. "
                                     "Please call `init_weights_update_group` first.")
            if req["load_format"] is not None:
                raise ValueError(f"load_format {req['load_format']!r} is not supported by opd rollout-server "
                                 "(send load_format null)")
            pg = self._groups[req["group_name"]]
            received = {}
            for name, dtype, shape in zip(names, dtypes, shapes):
                t = torch.empty([int(s) for s in shape], dtype=getattr(torch, str(dtype)))
                broadcast(pg, t)
                received[str(name)] = t
        except Exception as e:
            return False, f"Failed to receive weights: {e}"
        self._wait_idle()
        try:
            self.engine.load_state_dict_(received)
        except Exception as e:
            return False, (f"Failed to update parameter online: {e}. The full weights of the ModelRunner are "
                           "partially updated. Please discard the whole weights.")
        return self._finish_update(req, True, "Succeeded to update parameter online.")

    def _w_update_weights_from_disk(self, req) -> tuple[bool, str]:
        self._wait_idle()
        try:
            self.engine.load_from_disk_(req["model_path"])
        except Exception as e:
            return False, f"Failed to update weights: {e}.\nRolling back to original weights."
        return self._finish_update(req, True, "Succeeded to update model weights.")

    def _w_update_weights_from_tensor(self, req) -> tuple[bool, str]:
        if self._session is None:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        if self.engine.device.type != "cuda":
            return False, ("update_weights_from_tensor takes CUDA-IPC handles; this opd rollout-server runs on "
                           f"{self.engine.device} and cannot open them (start it with --device cuda, or use "
                           "/update_weights_from_distributed with backend gloo)")
        if req["load_format"] not in (None, "direct"):
            return False, f"load_format {req['load_format']!r} is not supported by opd rollout-server (null or direct)"
        payloads = req["serialized_named_tensors"]
        try:
            if not payloads or not isinstance(payloads[0], str):
                raise ValueError("serialized_named_tensors must hold one base64 string per TP rank")
            named = load_named_tensors(payloads[0])  # TP rank 0 reads entry 0
        except Exception as e:
            return False, f"Failed to deserialize serialized_named_tensors: {e}"
        self._wait_idle()
        try:
            self.engine.load_state_dict_(dict(named))
            torch.cuda.synchronize()  # done reading the sender's memory before it is told so
        except Exception as e:
            return False, f"Failed to update weights from tensor: {e}"
        return self._finish_update(req, True, "Success")

    def get_weights_by_name(self, body: dict) -> tuple[int, object]:
        """/get_weights_by_name {"name", "truncate_size": 100}: the parameter as float lists, cut
        after `truncate_size` entries of its first dimension (as SGLang's models answer it)."""
        name, size = body.get("name"), body.get("truncate_size", 100)
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool):
            return 400, {"object": "error", "message": "name (str) and truncate_size (int) are required",
                         "type": "Bad Request", "param": None, "code": 400}
        own = self.engine.model.state_dict()
        if name not in own:
            return 400, {"error": {"message": "Get parameter by name failed"}}
        return 200, own[name].detach().float().cpu()[:size].tolist()


# The globals a pickled [(name, CUDA tensor), ...] list refers to; all are on SGLang's allow-list.
_TENSOR_GLOBALS = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter"), ("torch", "Size"),
                   ("torch.storage", "TypedStorage"), ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage"),
                   ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), ("collections", "OrderedDict")}
_DTYPES = {"float32", "float", "float16", "half", "bfloat16", "float64", "double", "int64", "long", "int32", "int",
           "int16", "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2"}


def tensor_global_allowed(module: str, name: str) -> bool:
    return (module, name) in _TENSOR_GLOBALS or (module == "torch" and name in _DTYPES)


def _rebuild_cuda_tensor(*args):
    """torch's rebuild_cuda_tensor with the device given as a GPU UUID (SGLang's patched form)."""
    from torch.multiprocessing import reductions

    dev = args[6]
    if isinstance(dev, str):
        found = [i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == dev]
        if not found:
            raise ValueError(f"no GPU with uuid {dev} is visible to this server")
        dev = found[0]
    return reductions.rebuild_cuda_tensor(*args[:6], dev, *args[7:])


def load_named_tensors(payload: str) -> list[tuple[str, torch.Tensor]]:
    """One entry of `serialized_named_tensors` (base64 pickle of CUDA-IPC handles) opened with an
    allow-list, as SGLang's SafeUnpickler does: any other global is refused."""
    import base64
    import io
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return _rebuild_cuda_tensor
            if tensor_global_allowed(module, name):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")

    obj = Unpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    if not isinstance(obj, list) or not all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                            and isinstance(x[1], torch.Tensor) for x in obj):
        raise ValueError("expected a list of (name, tensor) pairs (load_format null)")
    return obj
