"""Each method's payloads and aggregation on tiny synthetic tensors: what stays local really
stays local, what is shared is averaged with sample-count weights."""

import pytest
import torch

from fedlease.fl import FLConfig
from fedlease.fl.strategies import STRATEGIES, Layout, make_strategy
from fedlease.fl.strategies.ifca import PICK_EXAMPLES

IN, OUT, R = 5, 3, 2
WEIGHTS = [1.0, 2.0, 3.0, 6.0]


def template(layout: Layout) -> dict[str, torch.Tensor]:
    """A fake model's adapter state for ``layout``: random A, zero B (like LoRA), a head."""
    g = torch.Generator().manual_seed(layout.num_experts)
    e = layout.num_experts
    state = {
        "enc.q.lora_A": torch.randn(e, R, IN, generator=g),
        "enc.q.lora_B": torch.zeros(e, OUT, R),
        "classifier.weight": torch.randn(2, IN, generator=g),
    }
    if e > 1:
        slots = 2 * e - 1 if layout.routing == "adaptive" else e
        state["enc.q.router"] = torch.randn(slots, IN, generator=g)
    return state


def trained(state, seed):
    """A client's state after 'training': every tensor moved by a client-specific amount."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}


def strategy(method, **kw):
    cfg = FLConfig(
        clients=["sst2"] * 4, method=method, warmup_rounds=1, rounds=2, precision="fp32", **kw
    )
    s = make_strategy(cfg, WEIGHTS)
    s.setup(template)
    return s


def one_round(s, r, kept, ids=(0, 1, 2, 3), loss_of=None):
    """Every client in ``ids`` trains from what it receives; returns the new states and uploads."""
    new, ups = {}, {}
    for cid in ids:
        t = template(s.layout(r))
        state = s.client_state(cid, t, kept[cid], s.down(cid, r), loss_of)
        new[cid] = trained(state, 10 * r + cid)
        ups[cid] = s.up(cid, r, new[cid])
    s.aggregate(r, ups)
    return new, ups


def wmean(tensors, ids):
    w = torch.tensor([WEIGHTS[i] for i in ids], dtype=torch.float64)
    return sum(t.double() * wi for t, wi in zip(tensors, w / w.sum())).float()


def test_the_config_takes_every_registered_method_and_its_help_names_them():
    from fedlease.fl.config import KEY_HELP, METHODS

    assert tuple(STRATEGIES) == METHODS and len(METHODS) == 10
    assert all(m in KEY_HELP["method"] for m in METHODS)


def test_local_sends_nothing():
    s = strategy("local")
    kept = [template(Layout())] * 4
    new, ups = one_round(s, 0, kept)
    assert all(s.down(c, 0) == {} and ups[c] == {} for c in range(4))
    got = s.client_state(2, template(Layout()), new[2], s.down(2, 0, final=True))
    assert all(torch.equal(got[k], new[2][k]) for k in got)


@pytest.mark.parametrize(
    "method, shared",
    [("fedit", ("lora_A", "lora_B")), ("ffa_lora", ("lora_B",)), ("fedsa_lora", ("lora_A",))],
)
def test_single_lora_methods_average_only_what_they_share(method, shared):
    s = strategy(method)
    kept = [template(Layout()) for _ in range(4)]
    new, ups = one_round(s, 0, kept, ids=(0, 2, 3))  # client 1 failed this round
    for up in ups.values():
        assert sorted(k.rsplit(".", 1)[1] for k in up) == sorted(shared)
    for name in shared:
        key = f"enc.q.{name}"
        want = wmean([new[i][key] for i in (0, 2, 3)], (0, 2, 3))
        assert torch.allclose(s.down(1, 1)[key], want, atol=1e-6)
    after = s.client_state(0, template(Layout()), new[0], s.down(0, 0, final=True))
    for key, value in after.items():  # the unshared tensors are the client's own
        if key.rsplit(".", 1)[1] not in shared:
            assert torch.equal(value, new[0][key])
    if method == "ffa_lora":
        assert s.frozen("enc.q.lora_A", 0) and not s.frozen("enc.q.lora_B", 0)


def test_feddpa_shares_expert_zero_and_keeps_the_personal_adapter_and_router():
    s = strategy("feddpa")
    layout = s.layout(0)
    assert layout == Layout(2, "dense")
    kept = [template(layout) for _ in range(4)]
    new, ups = one_round(s, 0, kept)
    assert all(set(u) == {"enc.q.lora_A", "enc.q.lora_B"} and u["enc.q.lora_A"].shape[0] == 1
               for u in ups.values())  # fmt: skip
    after = s.client_state(3, template(layout), new[3], s.down(3, 0, final=True))
    for key in ("enc.q.lora_A", "enc.q.lora_B"):
        want = wmean([new[i][key][0] for i in range(4)], range(4))
        assert torch.allclose(after[key][0], want, atol=1e-6)
        assert torch.equal(after[key][1], new[3][key][1])  # personal adapter untouched
    assert torch.equal(after["enc.q.router"], new[3]["enc.q.router"])


def test_ifca_clients_pick_their_lowest_loss_copy_and_copies_average_over_pickers():
    s = strategy("ifca", num_experts=3)
    assert len(s.down(0, 0)) == 3 * 2  # all copies go down
    copies = [c["enc.q.lora_B"].clone() for c in s.copies]
    kept = [template(Layout()) for _ in range(4)]
    # client c's loss is lowest for copy (c % 2): copies are told apart by their B
    picks = {}

    def loss_for(cid):
        def losses_of(states, limit):
            assert limit == PICK_EXAMPLES  # IFCA judges a copy on that many examples
            losses = []
            for state in states:
                k = next(i for i, b in enumerate(copies) if torch.equal(state["enc.q.lora_B"], b))
                picks.setdefault(cid, []).append(k)
                losses.append(0.0 if k == cid % 2 else 1.0 + k)
            return losses

        return losses_of

    new, ups = {}, {}
    for cid in range(4):
        state = s.client_state(cid, template(Layout()), kept[cid], s.down(cid, 0), loss_for(cid))
        assert torch.equal(state["enc.q.lora_B"], copies[cid % 2])
        new[cid] = trained(state, cid)
        ups[cid] = s.up(cid, 0, new[cid])
    s.aggregate(0, ups)
    assert s.assignment() == [0, 1, 0, 1]
    for k, members in ((0, (0, 2)), (1, (1, 3))):
        want = wmean([new[i]["enc.q.lora_B"] for i in members], members)
        assert torch.allclose(s.copies[k]["enc.q.lora_B"], want, atol=1e-6)
    assert torch.equal(s.copies[2]["enc.q.lora_B"], copies[2])  # no one picked copy 2
    assert torch.equal(s.down(3, 0, final=True)["enc.q.lora_B"], s.copies[1]["enc.q.lora_B"])


def _warm_uploads():
    """Four warm-up LoRAs whose B point two ways: clients {0, 1} and {2, 3}."""
    ups = []
    for cid in range(4):
        b = torch.zeros(1, OUT, R)
        b[0, cid // 2] = 1.0 + 0.01 * cid
        ups.append({"enc.q.lora_A": torch.randn(1, R, IN), "enc.q.lora_B": b})
    return ups


@pytest.mark.parametrize("method", ["fedlease", "fedlease_topk", "fedlease_random"])
def test_fedlease_allocates_then_averages_each_expert_within_its_cluster(method):
    s = strategy(method, max_experts=3)
    assert s.collect(0) is None and s.layout(0) == Layout()
    assert s.collect(1) is not None
    warm = _warm_uploads()
    s.on_collect(1, warm)
    assign = s.assignment()
    if method == "fedlease_random":
        assert sorted(assign) == [0, 0, 1, 1]  # same cluster sizes, shuffled membership
    else:
        assert assign == [0, 0, 1, 1]
    layout = s.layout(1)
    assert layout.num_experts == 2
    assert layout.routing == ("topk" if method == "fedlease_topk" else "adaptive")
    for k in range(2):  # expert k starts as the weighted mean of its members' adapters
        members = [i for i in range(4) if assign[i] == k]
        want = wmean([warm[i]["enc.q.lora_B"][0] for i in members], members)
        assert torch.allclose(s.experts["enc.q.lora_B"][k], want, atol=1e-6)
    kept = [template(Layout()) for _ in range(4)]
    new, ups = one_round(s, 1, kept, ids=(0, 1, 2))  # client 3 failed
    for cid, up in ups.items():
        own = assign[cid]
        assert torch.equal(up["enc.q.lora_B"], new[cid]["enc.q.lora_B"][own])
        assert s.own_expert(cid, 1) == own
    for k in range(2):
        members = [i for i in (0, 1, 2) if assign[i] == k]
        want = wmean([new[i]["enc.q.lora_A"][k] for i in members], members)
        assert torch.allclose(s.experts["enc.q.lora_A"][k], want, atol=1e-6)
        router = wmean([new[i]["enc.q.router"] for i in members], members)
        assert torch.allclose(s.routers[k]["enc.q.router"], router, atol=1e-6)
    assert torch.allclose(s.down(0, 1)["enc.q.lora_A"], s.experts["enc.q.lora_A"])
    head = s.client_state(2, template(layout), new[2], s.down(2, 1, final=True))
    assert torch.equal(head["classifier.weight"], new[2]["classifier.weight"])  # heads stay


def test_fedlease_fixed_k_skips_the_silhouette_search():
    s = strategy("fedlease_fixed_k", max_experts=3)
    s.on_collect(1, _warm_uploads())
    assert s.num_experts == 3 and s.allocation.silhouette == {}


def test_strategy_state_round_trips_through_a_checkpoint():
    for method in STRATEGIES:
        s = strategy(method, max_experts=2)
        if s.collect(1) is not None:
            s.on_collect(1, _warm_uploads())
        groups, meta = s.state()
        fresh = strategy(method, max_experts=2)
        fresh.restore(groups, meta)
        assert fresh.state()[1] == meta and fresh.assignment() == s.assignment()
        for g, tensors in fresh.state()[0].items():
            assert all(torch.equal(tensors[k], groups[g][k]) for k in tensors), (method, g)


@pytest.mark.parametrize("method", STRATEGIES)
def test_only_fedlease_warm_up_rounds_change_how_clients_train(method):
    s = strategy(method, warmup_optimizer="sgd", warmup_lr=0.07)
    warm = s.training(0)
    if method.startswith("fedlease"):
        assert (warm.optimizer, warm.lr, warm.class_balanced) == ("sgd", 0.07, True)
        assert warm.dropout is False
        assert isinstance(warm.make([torch.nn.Parameter(torch.ones(2))]), torch.optim.SGD)
    else:
        assert warm is None  # AdamW at the run's lr, as in every other round
    assert s.training(1) is None and s.training(2) is None


def test_sgd_warm_up_step_is_the_negative_gradient():
    """From B = 0, one SGD step leaves B = -lr * grad: the B matrices the allocation compares are
    gradient sums, not AdamW's per-coordinate signs."""
    from fedlease.fl.client import TrainSpec

    p = torch.nn.Parameter(torch.zeros(3, 2))
    grad = torch.randn(3, 2)
    for name, expected in (("sgd", -0.05 * grad), ("adamw", -0.05 * grad.sign())):
        p.data.zero_()
        opt = TrainSpec(name, 0.05).make([p])
        p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6)


def test_class_weights_make_every_present_class_weigh_the_same():
    from fedlease.fl.client import class_weights

    w = class_weights([1, 1, 1, 0, 1, 1, 1, 1], 3)  # 1 of class 0, 7 of class 1, none of 2
    torch.testing.assert_close(w, torch.tensor([4.0, 8 / 14, 1.0]))
    assert w[0] * 1 == pytest.approx(w[1] * 7)  # total weight per present class is equal


def _tiny_classifier_run(average_b: bool, steps_seen: list | None = None):
    """One SGD round of a 1-layer BERT with a LoRA on query/value over 24 random examples."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedlease.adapter_io import adapter_state_dict
    from fedlease.data.tokenize import ClientData, Encoded
    from fedlease.fl.client import ClientRunner, TrainSpec, clone_state
    from fedlease.inject import MoELoRAConfig, inject_moe_lora, moe_lora_layers

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_moe_lora(model, MoELoRAConfig(rank=2, trainable_modules=["classifier"]), "torch")
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in range(4, 28)]
    labels = [i % 2 for i in range(len(ids))]
    enc = Encoded({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}, labels)
    data = ClientData(0, "sst2", enc, enc)
    cfg = FLConfig(clients=["sst2"] * 2, lr=1e-3, weight_decay=0.0, batch_size=8,
                   eval_batch_size=8, local_epochs=1)  # fmt: skip
    runner = ClientRunner(model, 0, cfg, progress=False)
    handle = None
    if steps_seen is not None:  # record B after every optimizer step
        layers = list(moe_lora_layers(model).values())

        def record(*_):
            steps_seen.append([layer.lora_B.detach().clone() for layer in layers])

        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(record)
    spec = TrainSpec("sgd", 500.0, class_balanced=True, dropout=False, average_b=average_b)
    try:
        state, _ = runner.train(data, clone_state(adapter_state_dict(model)), 3, training=spec)
    finally:
        if handle is not None:
            handle.remove()
    return state


def test_warm_up_b_average_is_the_mean_of_b_over_the_steps():
    """``warmup_average_b``: the state a round returns holds each lora_B's mean over the round's
    three steps (recorded after each step), everything else as without averaging."""
    seen: list = []
    last = _tiny_classifier_run(False, seen)
    assert len(seen) == 3  # 24 examples, batches of 8
    averaged = _tiny_classifier_run(True)
    b_keys = sorted(k for k in averaged if k.endswith("lora_B"))
    assert len(b_keys) == 2 and b_keys == sorted(k for k in last if k.endswith("lora_B"))
    for i, k in enumerate(b_keys):
        mean = torch.stack([step[i] for step in seen]).mean(0)
        assert mean.abs().max() > 1e-5  # it trained
        torch.testing.assert_close(averaged[k], mean, rtol=1e-5, atol=1e-7)
        assert (averaged[k] - last[k]).abs().max() > 1e-3 * last[k].abs().max()
    for k in last:
        if not k.endswith("lora_B"):
            torch.testing.assert_close(averaged[k], last[k])
