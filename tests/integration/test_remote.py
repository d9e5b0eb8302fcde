"""The remote layer: the loopback NDIF server, by-value shipping, whitelist, version check, API key.

Every remote test drives nnsight's real ``RemoteBackend`` (``remote=True``, production code unchanged)
against ``LoopbackNDIF`` on 127.0.0.1, with a tiny random-weight GPT-2 and a word-level tokenizer built
here (no downloads). The smoke test against the real NDIF is tests/acceptance/test_ndif_live.py.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import uuid

import pytest
import torch

from interpkit.errors import UserError
from interpkit.remote import check_versions, configure, ensure_shipped, version_mismatches
from interpkit.remote.loopback import LoopbackNDIF
from interpkit.remote.whitelist import disallowed_imports, is_allowed

WORDS = ("the a cat dog sat on mat in Paris Rome is capital of France Italy Eiffel Tower Colosseum "
         "city famous located").split()
CLEAN = "the Eiffel Tower is located in the city of"
CORRUPT = "the Colosseum is located in the city of"


def tiny_gpt2():
    """A 2-layer, d=32 GPT-2 with random weights and a word-level tokenizer, wrapped for nnsight."""
    from nnsight import TransformersModel
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>",
                                  pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=len(vocab), n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = TransformersModel(GPT2LMHeadModel(config).eval(), tokenizer=tok)
    model.repo_id = "tiny:gpt2"          # not a hub id: the loopback server makes it usable offline
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


@pytest.fixture(scope="module")
def server(model):
    with LoopbackNDIF(model, timeout=60) as srv:
        yield srv


@contextlib.contextmanager
def by_value_registry():
    """Start from a process where our packages were never registered (load_model registers them) and
    undo registrations made inside (cloudpickle keeps them process-wide)."""
    from cloudpickle.cloudpickle import _PICKLE_BY_VALUE_MODULES

    before = set(_PICKLE_BY_VALUE_MODULES)
    _PICKLE_BY_VALUE_MODULES.difference_update({m for m in before if m.split(".")[0] in ("interpkit", "analyses", "tasks")})
    try:
        yield
    finally:
        _PICKLE_BY_VALUE_MODULES.clear()
        _PICKLE_BY_VALUE_MODULES.update(before)


# -- the traces under test (identical code for every backend) ---------------------------------------------
def patch_clean_into_corrupt(model, layer: int, remote):
    """Two invokes in one batch: the clean run's last-position residual at ``layer`` patched into the
    corrupted run."""
    with model.trace(remote=remote) as tracer:
        with tracer.invoke(CLEAN):
            clean_h = model.transformer.h[layer].output[:, -1].clone().save()
            clean_logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPT):
            h = model.transformer.h[layer].output
            h[:, -1] = clean_h
            patched_logits = model.lm_head.output[:, -1].save()
    return clean_h, clean_logits, patched_logits


def two_trace_session(model, remote):
    """Layer-0 activation of one prompt patched into layer 1 of another: needs two forwards."""
    with model.session(remote=remote):
        with model.trace(CORRUPT):
            h0 = model.transformer.h[0].output[:, -1]
        with model.trace(CLEAN):
            model.transformer.h[1].output[:, -1] = h0
            out = model.lm_head.output[:, -1].save()
    return out


def logit_diff_grads(model, remote):
    """Attribution-patching ingredients: activations and their gradients in one forward + backward.
    The embedding is made to require grad because NDIF serves frozen weights."""
    with model.trace(CLEAN, remote=remote):
        emb = model.transformer.wte.output
        emb.requires_grad_(True)
        h0 = model.transformer.h[0].output
        h1 = model.transformer.h[1].output
        logits = model.lm_head.output
        metric = logits[0, -1, 3] - logits[0, -1, 4]
        with metric.backward():
            g1 = h1.grad.save()
            g0 = h0.grad.save()
        a0, a1 = h0.detach().save(), h1.detach().save()
        value = metric.detach().save()
    return (a0, a1), (g0, g1), value


# -- results through the loopback equal local results ------------------------------------------------------
def test_patching_identical_locally_simulated_and_through_loopback(model, server):
    local = patch_clean_into_corrupt(model, 1, remote=False)
    simulated = patch_clean_into_corrupt(model, 1, remote="local")
    before = server.n_requests
    remote = patch_clean_into_corrupt(model, 1, remote=True)
    assert server.n_requests == before + 1
    record = server.requests[-1]
    assert record.status == "COMPLETED" and record.blocking and record.compress
    assert set(record.saved) == {"clean_h", "clean_logits", "patched_logits"}
    for a, b, c in zip(local, simulated, remote):
        assert isinstance(c, torch.Tensor) and torch.equal(a, b) and torch.equal(a, c)
    # patching the last layer's residual at the last position reproduces the clean logits
    assert torch.allclose(local[2], local[1], atol=1e-5)


def test_session_with_two_traces_is_one_request(model, server):
    local = two_trace_session(model, remote=False)
    before = server.n_requests
    remote = two_trace_session(model, remote=True)
    assert server.n_requests == before + 1
    assert torch.equal(local, remote)


def test_backward_inside_a_remote_trace(model, server):
    (a_local, g_local, v_local) = logit_diff_grads(model, remote=False)
    (a_remote, g_remote, v_remote) = logit_diff_grads(model, remote=True)
    assert torch.equal(v_local, v_remote)
    for x, y in zip(a_local + g_local, a_remote + g_remote):
        assert torch.allclose(x, y, atol=1e-6)
    assert g_remote[0].abs().sum() > 0
    assert all(p.requires_grad for p in model._module.parameters())   # frozen only while serving


def test_frozen_weights_need_an_activation_that_requires_grad(model, server):
    from nnsight.intervention.backends.remote import RemoteError

    with pytest.raises(RemoteError, match="does not require grad"):
        with model.trace(CLEAN, remote=True):
            h0 = model.transformer.h[0].output
            metric = model.lm_head.output[0, -1, 3]
            with metric.backward():
                g0 = h0.grad.save()  # noqa: F841


def test_large_results_download_and_non_blocking_polling(model, server):
    import time

    local = patch_clean_into_corrupt(model, 0, remote=False)
    limit, server.inline_limit = server.inline_limit, 0         # COMPLETED carries a /result URL
    try:
        downloaded = patch_clean_into_corrupt(model, 0, remote=True)
    finally:
        server.inline_limit = limit
    assert all(torch.equal(a, b) for a, b in zip(local, downloaded))

    with model.trace(CLEAN, remote=True, blocking=False) as tracer:
        logits = model.lm_head.output.save()  # noqa: F841
    deadline, result = time.monotonic() + 30, None
    while result is None and time.monotonic() < deadline:
        result = tracer.backend()                                 # polls GET /response/<id>
        time.sleep(0.02)
    assert result is not None and not server.requests[-1].blocking
    assert torch.allclose(result["logits"][:, -1], local[1], atol=1e-5)     # alone vs. batched


def test_prints_inside_the_trace_come_back_as_log_statuses(model, server, capsys):
    from nnsight import CONFIG

    logging_on, CONFIG.APP.REMOTE_LOGGING = CONFIG.APP.REMOTE_LOGGING, True
    try:
        with model.trace(CLEAN, remote=True, verbose=True):
            print("hello from the server side")
            out = model.lm_head.output.save()  # noqa: F841
    finally:
        CONFIG.APP.REMOTE_LOGGING = logging_on
    captured = capsys.readouterr()
    assert "LOG" in captured.out and "hello from the server side" in captured.out


# -- the import whitelist ---------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["abc", "itertools", "os"])
def test_non_whitelisted_import_fails_with_a_clear_message(model, server, module):
    from nnsight.intervention.backends.remote import RemoteError

    with pytest.raises(RemoteError) as info:
        with model.trace(CLEAN, remote=True):
            mod = __import__(module)
            names = mod.__name__
            out = model.lm_head.output.save()  # noqa: F841
    message = str(info.value)
    assert message.splitlines()[0] == f"ImportError: Module {module} is not whitelisted"
    assert "test_remote.py" in message                 # points at the offending line of this file
    assert server.requests[-1].status == "ERROR"


def test_whitelisted_imports_work_and_are_read_only(model, server):
    from nnsight.intervention.backends.remote import RemoteError

    with model.trace(CLEAN, remote=True):
        import math

        import einops
        import torch.nn.functional as F
        probs = F.softmax(model.lm_head.output[0, -1], -1)
        top = einops.reduce(probs, "v -> ", "max").save()
        scale = math.sqrt(4.0)
    assert 0 < float(top) <= 1 and "scale" not in locals()
    with pytest.raises(RemoteError, match="Attribute 'register' is not in the allowed list"):
        with model.trace(CLEAN, remote=True):
            import nnsight
            nnsight.register("x")


@pytest.fixture
def helper_module(tmp_path, monkeypatch):
    """Write a helper module outside site-packages, import it, and register it for by-value shipping
    (what nnsight's pull_env does for local modules); forgotten again afterwards."""
    import importlib

    import nnsight

    monkeypatch.syspath_prepend(str(tmp_path))
    names = []

    def make(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        module = importlib.import_module(name)
        nnsight.register(module)
        return module

    with by_value_registry():
        yield make
    for name in names:
        sys.modules.pop(name, None)


def test_helper_module_shipped_by_value(model, server, helper_module):
    good = helper_module("ndif_helper_good", "import einops\nimport torch\n\n\n"
                                             "def last_norm(h):\n    return einops.reduce(h[:, -1] ** 2, 'b d -> b', 'sum')\n")
    last_norm = good.last_norm              # ship the function, not the module object (see below)
    with model.trace(CLEAN, remote=True):
        norm = last_norm(model.transformer.h[1].output).save()
    with model.trace(CLEAN):
        expected = last_norm(model.transformer.h[1].output).save()
    assert torch.equal(norm, expected)


def test_helper_module_importing_abc_fails_at_deserialization(model, server, helper_module):
    """A local helper shipped by value whose functions use non-whitelisted modules is refused, as on NDIF
    (nnterp issue #48: ``Module abc is not whitelisted``)."""
    from nnsight.intervention.backends.remote import RemoteError

    source = ("import itertools\nfrom abc import ABC\n\n\nclass Base(ABC):\n    pass\n\n\n"
              "def n_pairs(xs):\n    return len(list(itertools.combinations(xs, 2)))\n")
    assert disallowed_imports(source) == ["itertools", "abc"]
    bad = helper_module("ndif_helper_bad", source)
    with pytest.raises(RemoteError) as info:
        with model.trace(CLEAN, remote=True):
            k = bad.n_pairs([1, 2, 3])
            out = model.lm_head.output[0, -1, :k].save()  # noqa: F841
    assert str(info.value).startswith("Failed to deserialize the request: ImportError: Module ")
    assert "is not whitelisted" in str(info.value)


def test_a_runaway_job_times_out_and_the_server_recovers(model):
    from nnsight.intervention.backends.remote import RemoteError

    with LoopbackNDIF(model, timeout=0.5) as srv:
        with pytest.raises(RemoteError, match="Job took longer than timeout: 0.5 seconds"):
            with model.trace(CLEAN, remote=True):
                import time
                h = model.transformer.h[0].output
                while h is not None:
                    time.sleep(0.01)
        with model.trace(CLEAN, remote=True):
            out = model.lm_head.output.save()
        assert out.shape[-1] == len(WORDS) + 2 and srv.requests[-1].status == "COMPLETED"


def test_our_packages_ship_only_by_value(model, server):
    """interpkit is not installed on NDIF: referenced by name it fails; ensure_shipped() fixes it; a
    module object shipped by value is still refused (NDIF checks dynamic_subimport's name)."""
    import interpkit.errors as errors_module
    from nnsight.intervention.backends.remote import RemoteError

    def naming_interpkit():
        """A trace whose code names one of our classes (UserError)."""
        with model.trace(CLEAN, remote=True):
            logits = model.lm_head.output
            if logits.shape[-1] < 0:
                raise UserError("impossible")
            out = logits[0, -1].save()
        return out

    with by_value_registry():
        with pytest.raises(RemoteError, match=r"Module interpkit\.errors is not whitelisted .*ensure_shipped"):
            naming_interpkit()
        assert ensure_shipped() == ("interpkit", "analyses", "tasks")
        assert naming_interpkit().shape == (len(WORDS) + 2,)

        with pytest.raises(RemoteError, match="not the module object"):
            with model.trace(CLEAN, remote=True):
                logits = model.lm_head.output
                if logits.shape[-1] < 0:
                    raise errors_module.UserError("impossible")


def test_whitelist_data():
    assert is_allowed("torch.nn.functional") and is_allowed("einops") and is_allowed("math")
    assert not is_allowed("torch.multiprocessing") and not is_allowed("torch.hub.load")
    assert not any(is_allowed(m) for m in ("abc", "itertools", "os", "logging", "random", "copy", "pathlib"))
    assert not is_allowed("nnsight.modeling") and is_allowed("nnsight.modeling", deserializing=True)
    assert not is_allowed("interpkit") and not is_allowed("interpkit", deserializing=True)


# -- versions -----------------------------------------------------------------------------------------------
def test_version_mismatch_is_a_clear_user_error(model, server):
    import nnsight
    import transformers

    assert check_versions("tiny:gpt2")["nnsight"] == nnsight.__version__     # same machine: agrees
    server.versions["nnsight"] = "0.7.0"
    try:
        with pytest.raises(UserError) as info:
            check_versions("tiny:gpt2")                                       # via GET /env
    finally:
        server.versions.clear()
    message = str(info.value)
    assert "\n" not in message and "tiny:gpt2" in message
    assert "nnsight 0.7.0" in message and nnsight.__version__ in message
    assert message.endswith("pip install nnsight==0.7.0")

    remote_env = {"python_version": sys.version,
                  "packages": {"nnsight": nnsight.__version__, "transformers": "4.57.1", "torch": "9.9"}}
    assert version_mismatches(remote_env) == {"transformers": (transformers.__version__, "4.57.1")}
    with pytest.raises(UserError, match=r"transformers 4\.57\.1 .*pip install transformers==4\.57\.1$"):
        check_versions("meta-llama/Llama-3.1-8B", remote_env=remote_env)


# -- the API key ---------------------------------------------------------------------------------------------
def test_api_key_reaches_the_server_and_is_never_logged(model, caplog, capfd):
    from nnsight import CONFIG
    from nnsight.intervention.backends.remote import RemoteError

    from interpkit.remote import api_key_present

    key = "ndif-test-" + uuid.uuid4().hex
    caplog.set_level(logging.DEBUG)
    with LoopbackNDIF(model, api_key=key) as srv:
        assert CONFIG.API.HOST == srv.url and api_key_present()
        with model.trace(CLEAN, remote=True, verbose=True):
            out = model.lm_head.output[0, -1].save()
        assert srv.saw_api_key(key) and out.shape == (len(WORDS) + 2,)
        configure(api_key="not-" + key)
        with pytest.raises(RemoteError, match="invalid NDIF API key"):
            with model.trace(CLEAN, remote=True):
                out = model.lm_head.output.save()
        records = repr(srv.requests)
    assert CONFIG.API.APIKEY != key and CONFIG.API.HOST != srv.url     # configuration restored
    captured = capfd.readouterr()
    for text in (caplog.text, captured.out, captured.err, records):
        assert key not in text


def test_a_model_the_server_does_not_serve_is_refused(server, monkeypatch):
    import nnsight.modeling.huggingface as hf
    from nnsight.intervention.backends.remote import RemoteError

    other = tiny_gpt2()
    other.repo_id = "tiny:other"
    monkeypatch.setitem(hf._ID_CACHE, "tiny:other", "tiny:other")
    with pytest.raises(RemoteError, match="tiny:other.* is not deployed on this server"):
        with other.trace(CLEAN, remote=True):
            out = other.lm_head.output.save()  # noqa: F841


def test_configure_rejects_bad_values():
    with pytest.raises(UserError):
        configure(host="api.ndif.us")
    with pytest.raises(UserError):
        configure(api_key="  ")
