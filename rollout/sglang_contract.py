"""What SGLang 0.5.23 accepts and how it refuses, for `opd rollout-server` (written by hand from
the 0.5.23 wheel's source; tests/test_rollout_sglang_semantics.py checks it against SGLang's own
classes: `sglang.api.v1.api_types`, `sglang.srt.sampling.sampling_params`, `sglang.srt.utils.auth`).

A /generate body goes through three gates there, each with its own reply shape:
1. the JSON contract (the generated decoder): wrong JSON types, unknown `sampling_params` keys
   -> 400 ``{"error": "<text>"}`` (serde's wording, e.g. ``invalid type: string "0.7", expected f64``);
2. `SamplingParams.verify()`: values out of range -> 400 ``{"error": {"message": "<text>"}}``;
3. the API-key middleware, before both: 401 ``{"error": "Unauthorized"}``.
"""

from __future__ import annotations

import hmac
import math

# sampling_params keys in SGLang's declaration order (the order its unknown-field message lists)
# and the JSON kind each must have.
SAMPLING_FIELDS: dict[str, str] = {
    "max_new_tokens": "int", "stop": "str_or_list", "stop_token_ids": "int_list", "stop_regex": "str_or_list",
    "temperature": "float", "top_p": "float", "top_k": "int", "min_p": "float", "frequency_penalty": "float",
    "presence_penalty": "float", "repetition_penalty": "float", "min_new_tokens": "int", "n": "int",
    "json_schema": "str", "regex": "str", "ebnf": "str", "structural_tag": "str", "ignore_eos": "bool",
    "skip_special_tokens": "bool", "spaces_between_special_tokens": "bool", "no_stop_trim": "bool",
    "stream_interval": "int", "logit_bias": "float_map", "sampling_seed": "int", "custom_params": "any",
    "beam_width": "int", "watermark": "map", "choice": "str_list",
}
# Top-level /generate keys this stand-in reads, with their kinds. SGLang ignores unknown top-level keys.
GENERATE_FIELDS: dict[str, str] = {
    "rid": "str_or_list", "text": "str_or_list", "input_ids": "ids_or_batch", "stream": "bool",
    "sampling_params": "sampling", "return_logprob": "bool_or_list", "logprob_start_len": "int_or_list",
    "top_logprobs_num": "int_or_list", "token_ids_logprob": "ids_or_batch", "return_text_in_logprobs": "bool",
    "routed_dp_rank": "int", "return_prompt_token_ids": "bool",
}
# SGLang's defaults (after its __post_init__: top_k -1 and null mean the whole vocabulary).
TOP_K_ALL = 1 << 30
SAMPLING_EPS = 1e-6


class ContractError(ValueError):
    """Gate 1: 400 {"error": str}."""


class VerifyError(ValueError):
    """Gate 2: 400 {"error": {"message": str}}."""


def _shown(v) -> str:  # how the decoder names the offending JSON value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f'string "{v}"'
    return {list: "sequence", dict: "map"}.get(type(v), type(v).__name__)


def _bad(v, expected: str) -> ContractError:
    return ContractError(f"invalid type: {_shown(v)}, expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(v, kind: str, list_name: str = "") -> None:
    """Raise ContractError unless the JSON value `v` has `kind` (null passes: the field's default)."""
    if v is None or kind == "any":
        return
    if kind == "int":
        if not _is_int(v):
            raise _bad(v, "i64")
    elif kind == "float":
        if not (_is_int(v) or isinstance(v, float)):
            raise _bad(v, "f64")
    elif kind == "bool":
        if not isinstance(v, bool):
            raise _bad(v, "a boolean")
    elif kind == "str":
        if not isinstance(v, str):
            raise _bad(v, "a string")
    elif kind == "map":
        if not isinstance(v, dict):
            raise _bad(v, "a map")
    elif kind in ("int_list", "str_list"):
        if not isinstance(v, list):
            raise _bad(v, "a sequence")
        for e in v:
            _check(e, kind[:-5])
    elif kind == "float_map":
        if not isinstance(v, dict):
            raise _bad(v, "a map")
        for e in v.values():
            _check(e, "float")
    elif kind in ("str_or_list", "bool_or_list", "int_or_list"):
        one = kind.split("_")[0]
        if isinstance(v, list):
            for e in v:
                _check(e, one)
        elif (one == "str" and not isinstance(v, str)) or (one == "bool" and not isinstance(v, bool)) or (
                one == "int" and not _is_int(v)):
            name = {"str": "StringOrList", "bool": "BoolOrList", "int": "Int64OrList"}[one]
            raise _bad(v, f"a value or an array of values for {name}")
    elif kind == "ids_or_batch":
        if not isinstance(v, list):
            raise _bad(v, "a value or an array of values for TokenIdsOrList")
        flat = not v or (isinstance(v[0], (int, float)) and not isinstance(v[0], bool))
        for row in ([v] if flat else v):
            _check(row, "int_list")
    else:
        raise AssertionError(kind)


def check_sampling_params(sp) -> None:
    if not isinstance(sp, dict):
        raise _bad(sp, "struct SamplingParams")
    for key, v in sp.items():
        kind = SAMPLING_FIELDS.get(key)
        if kind is None:
            listed = ", ".join(f"`{f}`" for f in SAMPLING_FIELDS)
            raise ContractError(f"unknown field `{key}`, expected one of {listed}")
        _check(v, kind)


def check_generate_body(body) -> None:
    """Gate 1 for a /generate body (the keys the stand-in reads; others are ignored, as there)."""
    if not isinstance(body, dict):
        raise _bad(body, "struct GenerateRequest")
    for key, kind in GENERATE_FIELDS.items():
        v = body.get(key)
        if v is None:
            continue
        if kind == "sampling":
            if isinstance(v, list):
                for e in v:
                    check_sampling_params(e)
            elif isinstance(v, dict):
                check_sampling_params(v)
            else:
                raise _bad(v, "a value or an array of values for SamplingParamsOrList")
        else:
            _check(v, kind)


def verify_sampling_params(sp: dict, vocab_size: int) -> dict:
    """Gate 2: SGLang's defaults and null handling, then its range checks. Returns the resolved
    values (temperature below 1e-6 becomes greedy: top_k 1, temperature 1, as there)."""
    def get(k, default):
        v = sp.get(k)
        return default if v is None else v

    r = {"max_new_tokens": sp.get("max_new_tokens", 128), "temperature": get("temperature", 1.0),
         "top_p": get("top_p", 1.0), "top_k": get("top_k", -1), "min_p": get("min_p", 0.0),
         "frequency_penalty": get("frequency_penalty", 0.0), "presence_penalty": get("presence_penalty", 0.0),
         "repetition_penalty": get("repetition_penalty", 1.0), "min_new_tokens": get("min_new_tokens", 0),
         "n": get("n", 1), "beam_width": sp.get("beam_width"), "sampling_seed": sp.get("sampling_seed"),
         "logit_bias": sp.get("logit_bias")}
    r["greedy"] = 0 <= r["temperature"] < SAMPLING_EPS
    if r["greedy"]:
        r["temperature"], r["top_k"] = 1.0, 1
    if r["top_k"] == -1:
        r["top_k"] = TOP_K_ALL
    if r["beam_width"] is not None and r["beam_width"] < 1:
        raise VerifyError(f"beam_width must be at least 1, got {r['beam_width']}.")
    t = float(r["temperature"])
    if not math.isfinite(t) or t < 0.0:
        raise VerifyError(f"temperature must be a non-negative finite number, got {r['temperature']}.")
    if not 0.0 < r["top_p"] <= 1.0:
        raise VerifyError(f"top_p must be in (0, 1], got {r['top_p']}.")
    if not 0.0 <= r["min_p"] <= 1.0:
        raise VerifyError(f"min_p must be in [0, 1], got {r['min_p']}.")
    if r["top_k"] < 1:
        raise VerifyError(f"top_k must be -1 (disable) or at least 1, got {r['top_k']}.")
    for k in ("frequency_penalty", "presence_penalty"):
        if not -2.0 <= r[k] <= 2.0:
            raise VerifyError(f"{k} must be in [-2, 2], got {r[k]}.")
    if not 0.0 < r["repetition_penalty"] <= 2.0:
        raise VerifyError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {r['repetition_penalty']}.")
    if r["min_new_tokens"] < 0:
        raise VerifyError(f"min_new_tokens must be in [0, max_new_tokens], got {r['min_new_tokens']}.")
    m = r["max_new_tokens"]
    if m is not None:
        if m < 0:
            raise VerifyError(f"max_new_tokens must be at least 0, got {m}.")
        if r["min_new_tokens"] > m:
            raise VerifyError(f"min_new_tokens must be in [0, max_new_tokens({m})], got {r['min_new_tokens']}.")
    for tok in r["logit_bias"] or {}:
        if not 0 <= int(tok) < vocab_size:
            raise VerifyError(f"logit_bias must has keys in [0, {vocab_size - 1}], got {tok}.")
    seed = r["sampling_seed"]
    if seed is not None and not -(2**63) <= seed <= 2**63 - 1:
        raise VerifyError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    if sum(sp.get(k) not in (None, "") for k in ("json_schema", "regex", "ebnf", "structural_tag")) > 1:
        raise VerifyError("Only one of json_schema, regex, ebnf, or structural_tag can be set.")
    return r


# ---- API keys ---------------------------------------------------------------------------------
# Paths SGLang's middleware never guards (matched by prefix there).
OPEN_PREFIXES = ("/health", "/ready", "/metrics")
# The stand-in's routes that SGLang marks ADMIN_OPTIONAL (http_server.py @auth_level): with
# --admin-api-key set they take only that key; every other route takes --api-key.
ADMIN_OPTIONAL_ROUTES = frozenset({
    "/flush_cache", "/update_weights_from_disk", "/init_weights_update_group", "/destroy_weights_update_group",
    "/update_weights_from_distributed", "/update_weights_from_tensor", "/begin_weight_update",
    "/end_weight_update", "/update_weight_version", "/release_memory_occupation", "/resume_memory_occupation",
    "/pause_generation", "/continue_generation", "/abort_request",
})


def _bearer_ok(header: str | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    return bool(_) and scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


def auth_status(method: str, path: str, authorization: str | None, api_key: str | None,
                admin_api_key: str | None) -> int:
    """200 if SGLang's middleware lets the request through, else its status (401)."""
    if method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return 200
    if path in ADMIN_OPTIONAL_ROUTES:
        key = admin_api_key or api_key
    else:
        key = api_key
    if key and not _bearer_ok(authorization, key):
        return 401
    return 200
