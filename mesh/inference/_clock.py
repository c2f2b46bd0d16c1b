"""Which deployment of a model is newest, decided without wall clocks.

Devices' clocks disagree (a laptop hours behind is common), so a deployment's
``created`` is a Lamport time: each node keeps the highest ``created`` it has seen in
any serving entry, and a new deployment takes one more. A node whose clock is wrong can
still redeploy, and its deployment is newer than every one it had seen.

A member could advertise an absurd time to make its deployment win for good. A node
therefore refuses entries more than MAX_JUMP ahead of its own clock: honest times grow
by one per deploy, so a mesh would need a million deploys to reach such a gap, and a
member that keeps raising the bar is merely redeploying, which members may do.
"""

MAX_JUMP = 1 << 20


class DeploymentClock:
    def __init__(self) -> None:
        self.value = 0

    def admits(self, created: int) -> bool:
        return created <= self.value + MAX_JUMP

    def observe(self, created: int) -> bool:
        """Move the clock up to ``created``; False (and no move) if it is not admitted."""
        if not self.admits(created):
            return False
        self.value = max(self.value, created)
        return True

    def tick(self) -> int:
        """The time of a new deployment: later than every one observed."""
        self.value += 1
        return self.value
