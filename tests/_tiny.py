"""The tiny protocol every study test runs: the base nets of the session's shared store
(`shared_bases`, conftest.py) and the flags that make an entry point find them.

The studies' MLP at a fifth of the seed's widths, 784-200-200-100-40-10 (221k weights against
the seed's 2.3M), trained 50 Adam steps at learning rate 0.01: the same machinery (four hidden
layers, the last one study 4 can keep, width buckets) in half the time (the tests of studies 2,
3 and 5, the grid and resuming: 153 s on the seed's widths, 78 s on these, 2 cores). Adam, since
plain SGD barely trains so narrow a net from the seed's initialisation in 50 steps (23% test
accuracy at learning rate 0.1, against 78% with Adam; the seed's net reaches 72% with SGD), and
studies retrain with the base net's optimizer.
"""

HIDDEN = [200, 200, 100, 40]
# The base nets' training protocol and the pruning scope, as in a study's config.
PROTOCOL = {"mnist_dir": None, "hidden": HIDDEN, "train_steps": 50, "batch_size": 100,
            "learning_rate": 0.01, "optimizer": "adam", "scope": "layer",
            "retrain_base": False}
# The same on an entry point's command line (the other keys are the flags' defaults).
FLAGS = [f"--hidden={','.join(map(str, HIDDEN))}", "--train_steps=50", "--optimizer=adam",
         "--learning_rate=0.01"]
