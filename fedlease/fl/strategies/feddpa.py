"""FedDPA (Yang et al., NeurIPS 2024): a global adapter and a personal adapter per client.

Each client's model holds two LoRA experts under a dense router: expert 0 is the *global*
adapter (FedAvg over all clients each round, weighted by sample count), expert 1 the *personal*
adapter, which never leaves the client. The router (kept local, like the head) gives every
token its mixing weight between the two, FedDPA's instance-wise dynamic weighting. Both adapters
train together in each local round (FedDPA-F trains them in sequence; here one pass does both).

Sends up / gets down: expert 0's A and B. Stays local: expert 1, router, head.
"""

from __future__ import annotations

from .base import Layout, Strategy, is_expert, merge, restored, select

GLOBAL = 0


class FedDPA(Strategy):
    name = "feddpa"

    def layout(self, r):
        return Layout(2, "dense")

    def setup(self, template):
        super().setup(template)
        adapters = select(template(self.layout(0)), is_expert)
        self.global_ = {k: v[GLOBAL : GLOBAL + 1].clone() for k, v in adapters.items()}

    def down(self, cid, r, final=False):
        return dict(self.global_)

    def client_state(self, cid, template, kept, received, loss_of=None):
        state = merge(template, kept, {})
        for k, v in received.items():
            state[k][GLOBAL : GLOBAL + 1] = v
        return state

    def up(self, cid, r, new):
        return {k: v[GLOBAL : GLOBAL + 1].clone() for k, v in select(new, is_expert).items()}

    def aggregate(self, r, ups):
        if ups:
            ids = sorted(ups)
            self.global_ = self.combine([ups[i] for i in ids], [self.weights[i] for i in ids])

    @property
    def num_experts(self):
        return 2

    def state(self):
        return {"global": self.global_}, {}

    def restore(self, groups, meta):
        self.global_ = restored(self.global_, groups, "global")
