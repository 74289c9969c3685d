"""OpenAI-compatible request bodies and the error shape {"error": {"message", "type", "param", "code"}}.

Every field of OpenAI's and vLLM's completion and chat-completion requests is either a typed field below (strict: a
wrong type is a 400, never a silent coercion; numbers must be finite and in range) or listed in REJECTED, which
answers a 400 naming it unless it holds its neutral value. A field in neither is refused as OpenAI does
("Unrecognized request argument"). docs/serving.md has the table.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_N = 16  # choices per prompt
MAX_STOP = 16  # stop strings (each at most MAX_STOP_CHARS characters)
MAX_STOP_CHARS = 256
MAX_TOKEN_LIST = 4096  # stop_token_ids, allowed_token_ids
MAX_LOGIT_BIAS = 1024
NAME_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"  # function and schema names (OpenAI: a-z, A-Z, 0-9, _ and -)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Strict(BaseModel):
    # known fields must have the right type and finite numbers; unknown ones are refused (check_fields says which)
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, populate_by_name=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class JsonSchemaFormat(_Strict):
    name: str = Field("response", pattern=NAME_PATTERN)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's newer `structured_outputs` object (one of json / regex / choice / grammar / json_object)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None
    disable_fallback: bool | None = None
    disable_additional_properties: bool | None = None
    whitespace_pattern: None = None
    structural_tag: None = None


class _Sampling(_Strict):
    model: str = Field(max_length=1024)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_TOKEN_LIST)
    ignore_eos: bool | None = False
    n: int | None = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    allowed_token_ids: list[int] | None = Field(None, min_length=1, max_length=1 << 20)
    min_tokens: int | None = Field(0, ge=0, le=INT64_MAX)
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: Literal["xgrammar", "auto"] | None = None
    structured_outputs: StructuredOutputs | None = None
    user: str | None = Field(None, max_length=1024)
    request_id: str | None = Field(None, min_length=1, max_length=256)
    return_token_ids: bool | None = False
    return_tokens_as_token_ids: bool | None = False
    # accepted and without effect here: this server keeps no prompt cache to salt or key, and records no identity
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    prompt_cache_key: str | None = Field(None, max_length=1024)
    safety_identifier: str | None = Field(None, max_length=1024)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=INT64_MAX)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    add_special_tokens: bool | None = True


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # what OpenAI's client sends back when an answer is appended to the conversation as it came
    refusal: str | None = None
    annotations: list | None = None
    audio: None = None
    function_call: None = None
    reasoning_content: str | None = None


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class DeltaLoadRequest(_Strict):
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096)


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize: a prompt, or chat messages rendered with the model's template."""

    model: str = Field(max_length=1024)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    tools: list[Tool] | None = Field(None, max_length=128)
    return_token_strs: bool | None = False


class DetokenizeRequest(_Strict):
    model: str = Field(max_length=1024)
    tokens: list[int] = Field(max_length=1 << 20)


# Fields of OpenAI's and vLLM's schemas that this server does not implement: (values that mean "not used", why).
# None always means "not used". A request that sets one to anything else gets a 400 naming it.
_BEAM = "beam search is not supported"
_COMMON_REJECTED: dict[str, tuple[tuple, str]] = {
    "use_beam_search": ((False,), _BEAM),
    "length_penalty": ((1, 1.0), f"length_penalty applies to beam search; {_BEAM}"),
    "bad_words": (([],), "bad_words is not supported (use logit_bias or allowed_token_ids)"),
    "prompt_logprobs": ((), "prompt_logprobs is not supported (use echo with logprobs on /v1/completions)"),
    "logits_processors": (([],), "custom logits processors are not supported"),
    "guided_whitespace_pattern": ((), "guided_whitespace_pattern is not supported: structured JSON output is compact"),
    "structural_tag": ((), "structural tags are not supported"),
    "priority": ((0,), "priority scheduling is not supported"),
    "kv_transfer_params": (({},), "KV transfer (disaggregated serving) is not supported"),
    "vllm_xargs": (({},), "vllm_xargs (custom extensions) are not supported"),
    "spaces_between_special_tokens": ((True,), "spaces_between_special_tokens=false is not supported"),
    "lora_request": ((), "select a delta or LoRA adapter by `model`"),
    "mm_processor_kwargs": (({},), "multimodal inputs are not supported"),
    "service_tier": (("auto", "default"), "service tiers are not supported"),
    "store": ((False,), "stored completions are not supported"),
    "metadata": (({},), "metadata is kept only with stored completions, which are not supported"),
}
COMPLETION_REJECTED: dict[str, tuple[tuple, str]] = {
    **_COMMON_REJECTED,
    "suffix": (("",), "suffix (text insertion) is not supported"),
    "prompt_embeds": ((), "prompt embeddings are not supported"),
}
CHAT_REJECTED: dict[str, tuple[tuple, str]] = {
    **_COMMON_REJECTED,
    "echo": ((False,), "echo is supported on /v1/completions only"),
    "documents": (([],), "documents (RAG templates) are not supported"),
    "chat_template": ((), "a per-request chat template is not supported: the model's own template is used"),
    "chat_template_kwargs": (({},), "chat_template_kwargs are not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported"),
    "include_reasoning": ((True,), "reasoning output is not separated by this server"),
    "functions": (([],), "`functions` is deprecated: use `tools` (with tool_choice required or a named function)"),
    "function_call": (("none",), "`function_call` is deprecated: use `tool_choice`"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "web search is not supported"),
    "verbosity": ((), "verbosity is not supported"),
}


def check_fields(model: type[BaseModel], body: dict, rejected: dict[str, tuple[tuple, str]]) -> dict:
    """Refuse unsupported fields (400 naming the field) and unknown ones; return the body without the unsupported
    fields that hold their neutral value."""
    out = {}
    for key, value in body.items():
        if key in rejected:
            neutral, why = rejected[key]
            if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
                raise APIError(400, f"`{key}` is not supported by this server: {why}", param=key, code="unsupported_parameter")
            continue
        if key not in model.model_fields and not any(f.alias == key for f in model.model_fields.values()):
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        out[key] = value
    return out


def validate(model: type[BaseModel], body, rejected: dict[str, tuple[tuple, str]] | None = None) -> BaseModel:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if rejected is not None:
        body = check_fields(model, body, rejected)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise APIError(400, f"invalid {loc or 'body'}: {first.get('msg', 'invalid value')}", param=loc or None) from None
