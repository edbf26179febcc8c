"""The device protocol on the CPU: a model runs whole or as layer ranges over one KV cache, and
every way gives the same logits."""

import copy
import dataclasses

import numpy as np
import pytest
import tiny_gguf as tg

import ember
from ember.devices.base import Device
from ember.devices.cpu import CpuDevice


@pytest.mark.parametrize("family", ["llama", "gemma3", "mixtral"])
@pytest.mark.parametrize("kernels", ["auto", "numpy"])
def test_layer_ranges_give_the_whole_model(tmp_path, family, kernels):
    path = tg.write_family(tmp_path / "m.gguf", family, qtype="Q8_0", n_ctx=64)
    m = ember.load(path, kernels=kernels)
    tr, dev = m.transformer, m.device
    assert isinstance(dev, Device)
    n_layer = m.config.n_layer
    ids = np.random.default_rng(3).integers(0, m.config.n_vocab, 11).tolist()
    whole_cache = dev.new_cache(tr, 64)
    whole = np.concatenate([dev.forward(tr, ids[:7], whole_cache), dev.forward(tr, ids[7:], whole_cache)])
    cache = dev.new_cache(tr, 64)
    outs = []
    for part in (ids[:7], ids[7:]):
        h = part
        for lo in range(n_layer):  # one layer at a time
            h = dev.forward(tr, h, cache, layers=range(lo, lo + 1))
            if lo < n_layer - 1:  # the hidden state; the positions are not committed yet
                assert h.shape == (len(part), m.config.n_embd)
                assert cache.length == (7 if outs else 0)
        outs.append(h)
    assert cache.length == whole_cache.length == len(ids)
    got = np.concatenate(outs)
    if dev.decoder(tr) is not None:  # the fused step over ranges: the same arithmetic, bit for bit
        assert np.array_equal(got, whole)
    np.testing.assert_allclose(got, whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())


def test_bad_layer_ranges(tmp_path):
    path = tg.write_family(tmp_path / "m.gguf", "llama", n_ctx=16)
    m = ember.load(path)
    for bad in (range(0, 0), range(0, m.config.n_layer + 1), range(0, 2, 2)):
        with pytest.raises(ValueError, match="layers"):
            m.device.forward(m.transformer, [1, 2], m.device.new_cache(m.transformer, 16), layers=bad)


def test_cpu_device_caches_its_fused_step_per_model(catalog_model):
    m = catalog_model("smollm2-135m")
    dev = CpuDevice(2)
    assert dev.decoder(m.transformer) is dev.decoder(m.transformer) is not None
    assert CpuDevice(1, fused=False).decoder(m.transformer) is None


def test_fused_step_reads_the_matrices_it_is_handed(tmp_path):
    """A streamer hands each layer range its own buffers: the step reads those (the same bytes
    give the same logits, bit for bit; other bytes give other logits), checked for count and
    shape."""
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=32)
    m = ember.load(path)
    tr, dev = m.transformer, m.device
    dec = dev.decoder(tr)
    if dec is None:
        pytest.skip("no fused step on this host")
    ids = np.random.default_rng(5).integers(0, m.config.n_vocab, 5).tolist()
    want = dev.forward(tr, ids, dev.new_cache(tr, 32))
    n_layer = m.config.n_layer

    def run(copy_of):
        cache = dev.new_cache(tr, 32)
        h = ids
        for lo in range(n_layer):
            layers = range(lo, lo + 1)
            mats = [copy_of(tr.store.matrix(name)) for name in dec.matrix_names(layers)]
            h = dec.step_rows(h, cache, layers=layers, mats=mats)
        return h

    def copy_of(q):
        return dataclasses.replace(q, packed=copy.deepcopy(q.packed))

    def zeroed_q0(q):
        if q.name != "blk.0.attn_q.weight":
            return q
        q = copy_of(q)
        for a in vars(q.packed).values():
            if isinstance(a, np.ndarray):
                a[...] = 0
        return q

    assert np.array_equal(run(copy_of), want)
    assert not np.allclose(run(zeroed_q0), want)
    assert np.array_equal(dev.forward(tr, ids, dev.new_cache(tr, 32)), want)  # the placed ones
    with pytest.raises(ValueError, match="matrices"):
        dec.step_rows(ids, dev.new_cache(tr, 32), layers=range(0, 1), mats=[])
    swapped = [tr.store.matrix(n) for n in dec.matrix_names(range(0, 1))]
    swapped[0], swapped[-1] = swapped[-1], swapped[0]
    with pytest.raises(ValueError, match="shape"):
        dec.step_rows(ids, dev.new_cache(tr, 32), layers=range(0, 1), mats=swapped)


def test_a_session_switches_threads_and_keeps_its_cache(tmp_path):
    """use_threads: the same device on fewer threads (one placement, the siblings shared), the
    same logits on either; a model streaming under a memory budget runs on all of them."""
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=64)
    m = ember.load(path, threads=2, memory_budget=None)
    dev = m.device
    one = dev.with_threads(1, m.transformer)
    assert one.threads == 1 and one.placement is dev.placement and one.with_threads(2) is dev
    assert dev.with_threads(1) is one
    ids = np.random.default_rng(5).integers(0, m.config.n_vocab, 9).tolist()
    a, b = m.session(), m.session()
    a.feed(ids[:5])
    b.feed(ids[:5])
    b.use_threads(1)
    assert b.threads == 1
    np.testing.assert_allclose(b.feed(ids[5:]), a.feed(ids[5:]), rtol=1e-4, atol=1e-4)
    b.use_threads(2)
    assert b.device is dev and b.ids == a.ids


def test_auto_says_what_it_chose_and_why(tmp_path):
    """device="auto" runs on the CPU so far: without a GPU the reason names what is here; with
    one (a listing that has a GPU) it names the GPU and the options that use it. A reply's
    stats carry the reason; a device asked for says so."""
    from ember.devices import auto_choice

    here = [{"name": "cpu", "what": "x"}, {"name": "opencl:0", "what": "PoCL", "type": "CPU"}]
    here.append({"name": "cuda", "missing": "no usable CUDA GPU (no driver)"})
    name, why = auto_choice(here)
    assert name == "cpu" and why == "no GPU here (opencl:0 is a CPU device; cuda: no usable CUDA GPU)"
    name, why = auto_choice(here[:2] + [{"name": "cuda:0", "what": "NVIDIA H100", "type": "GPU"}])
    assert name == "cpu" and "cuda:0 (NVIDIA H100)" in why and "--device cpu+cuda:0" in why
    path = tg.write_family(tmp_path / "m.gguf", "llama", qtype="Q8_0", n_ctx=64)
    m = ember.load(path)
    for _ in m.generate([1, 2, 3], max_tokens=2):
        pass
    assert m.stats["device_choice"].startswith("cpu: ") and m.stats["device"].startswith("cpu (")
    assert ember.load(path, device="cpu").device_choice == "cpu, as asked"


def test_auto_lists_devices_only_where_a_gpu_node_is(monkeypatch):
    """Listing the OpenCL and CUDA devices loads their drivers (~0.3 s, ~160 MB with PoCL): auto
    does it only where a GPU's device node exists."""
    import ember.devices as devices

    def listing():
        raise AssertionError("the devices were listed")

    monkeypatch.setattr(devices, "available", listing)
    monkeypatch.setattr(devices, "gpu_nodes", lambda: [])
    name, why = devices.auto_choice()
    assert name == "cpu" and why.startswith("no GPU here (no GPU device node: /dev/nvidia")
    monkeypatch.setattr(devices, "gpu_nodes", lambda: ["/dev/dri/renderD128"])
    monkeypatch.setattr(devices, "available", lambda: [{"name": "cpu", "what": "x"}])
    assert devices.auto_choice() == ("cpu", "no GPU here")
