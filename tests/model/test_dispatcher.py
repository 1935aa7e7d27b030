import torch

from moetrain.model.moe.dispatcher import TokenDispatcher
from moetrain.model.moe.router import RouterOutput


def routing(idx, weight, keep=None, capacity=None):
    T, E = idx.shape[0], 8
    dummy = torch.zeros(T, E)
    return RouterOutput(dummy, dummy, weight, idx, keep, capacity)


def test_permute_groups_rows_by_expert_in_token_order():
    x = torch.arange(4.0).unsqueeze(1).repeat(1, 3)  # row t holds t
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    w = torch.ones(4, 2)
    x_ND, counts, handle = TokenDispatcher(4).dispatch(x, routing(idx, w))
    assert counts.tolist() == [3, 2, 2, 1]
    assert x_ND[:, 0].tolist() == [0, 1, 3, 1, 2, 0, 2, 3]
    assert counts.dtype == torch.int64


def test_combine_weights_and_drops():
    x = torch.randn(4, 3)
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    w = torch.rand(4, 2, requires_grad=True)
    keep = torch.tensor([[True, False], [True, True], [False, False], [True, True]])
    disp = TokenDispatcher(4)
    x_ND, counts, handle = disp.dispatch(x, routing(idx, w, keep))
    assert counts.tolist() == [2, 1, 1, 1]  # dropped assignments are not counted for experts
    # static shapes: every assignment has a row, the 3 dropped ones last, zeroed
    assert x_ND.shape == (8, 3) and torch.equal(x_ND[5:], torch.zeros(3, 3))
    scale = torch.tensor([10.0, 20.0, 30.0, 40.0])  # "expert e multiplies by scale[e]"
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    y_ND = x_ND[:5] * scale[expert_of_row].unsqueeze(1)
    # the experts leave the rows after their counts undefined: garbage must not leak out
    y = disp.combine(torch.cat([y_ND, torch.full((3, 3), float("nan"))]), handle)
    y.sum().backward()  # nor into the weights' gradient (0 * NaN)
    assert torch.isfinite(w.grad).all()
    expected = torch.zeros(4, 3)
    for t in range(4):
        for j in range(2):
            if keep[t, j]:
                expected[t] += w[t, j].detach() * scale[idx[t, j]] * x[t]
    torch.testing.assert_close(y.detach(), expected)
    assert torch.equal(y[2].detach(), torch.zeros(3))  # fully dropped token contributes nothing


def test_pad_to_capacity_gives_static_shapes():
    x = torch.randn(4, 3)
    idx = torch.tensor([[2, 0], [0, 1], [2, 1], [3, 0]])
    w = torch.rand(4, 2)
    keep = torch.ones(4, 2, dtype=torch.bool)
    keep[3, 1] = False
    disp = TokenDispatcher(4, pad_to_capacity=True)
    x_ND, counts, handle = disp.dispatch(x, routing(idx, w, keep, capacity=2))
    assert x_ND.shape == (8, 3) and counts.tolist() == [2, 2, 2, 2]
    assert torch.equal(x_ND[0], x[0]) and torch.equal(x_ND[1], x[1])  # expert 0: tokens 0, 1
    assert torch.equal(x_ND[7], torch.zeros(3))  # expert 3 holds one token + one pad row
    y = disp.combine(x_ND, handle)
    unpadded = TokenDispatcher(4)
    x2, _, h2 = unpadded.dispatch(x, routing(idx, w, keep))
    torch.testing.assert_close(y, unpadded.combine(x2, h2))


def test_empty_experts_and_no_tokens():
    disp = TokenDispatcher(5)
    x = torch.randn(3, 2)
    idx = torch.tensor([[1], [1], [4]])
    x_ND, counts, handle = disp.dispatch(x, routing(idx, torch.ones(3, 1)))
    assert counts.tolist() == [0, 2, 0, 0, 1]
    torch.testing.assert_close(disp.combine(x_ND, handle), x)
    empty = torch.zeros(0, 2)
    x_ND, counts, handle = disp.dispatch(
        empty, routing(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)))
    assert x_ND.shape == (0, 2) and counts.tolist() == [0] * 5
    assert disp.combine(x_ND, handle).shape == (0, 2)


def test_gradients_flow_through_dispatch_and_combine():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.rand(5, 2, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 3], [3, 1]])
    disp = TokenDispatcher(4)
    x_ND, _, handle = disp.dispatch(x, routing(idx, w))
    y = disp.combine(x_ND * 3.0, handle)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 3.0 * w.detach().sum(1, keepdim=True).expand(5, 3))
    torch.testing.assert_close(w.grad, 3.0 * x.detach().sum(1, keepdim=True).expand(5, 2))


class _RecordingExchange:
    """What expert parallelism replaces: the exchange between permute and experts."""

    def __init__(self):
        self.calls = []

    def open(self, x_ND, counts, *, chunks=1, budget=None, capacity=None, asynchronous=False):
        self.calls.append(("open", chunks, budget))
        exchange = self

        class Flow:
            counters = None

            def __init__(self):
                self.chunks = 1

            def send(self, c):
                exchange.calls.append("send")

            def receive(self, c):
                exchange.calls.append("receive")
                return x_ND * 2, counts, 0

            def send_back(self, c, y):
                exchange.calls.append("send_back")
                self.y = y

            def gather(self):
                exchange.calls.append("gather")
                return self.y / 2

        return Flow()


def test_exchange_hooks_sit_between_permute_and_unpermute():
    exchange = _RecordingExchange()
    disp = TokenDispatcher(3, exchange=exchange)
    x = torch.randn(4, 2)
    idx = torch.tensor([[0], [2], [1], [2]])
    x_ND, _, handle = disp.dispatch(x, routing(idx, torch.ones(4, 1)))
    y = disp.combine(x_ND, handle)
    assert exchange.calls == [("open", 1, None), "send", "receive", "send_back", "gather"]
    torch.testing.assert_close(y, x)
