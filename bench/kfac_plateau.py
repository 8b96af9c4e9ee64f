"""Why KFAC sits on a plateau on the CURVES autoencoder: its Fisher factors against the damping.

At initialisation (after the warm start the runner does, from the whole training set), print
per layer of the problem's model, for KFAC with the problem's hyper-parameters (CURVES: the
paper's Table 6, lr 0.3, damping lambda = 10):

* the mean eigenvalue (trace / size) and the largest eigenvalue of Omega and Gamma, each
  divided by the damping term line 19 of Algorithm 5 adds to it (``pi sqrt(lambda)`` and
  ``sqrt(lambda) / pi``);
* the same for the Kronecker product Omega (x) Gamma against lambda.

A ratio far below 1 means that the damped inverse is about ``I / damping``: the layer's step is
the momentum buffer times ``lr / lambda``, momentum SGD, whatever the curvature.

    python bench/kfac_plateau.py [--problem curves-ae] [--data-dir DIR] [--seed 1]
"""

from __future__ import annotations

import argparse
import math

import torch

from kbfgs.experiments.problems import get_problem
from kbfgs.experiments.runner import load_problem_data, make_method_optimizer, resolve_hps


def _eig(t: torch.Tensor) -> tuple[float, float]:
    """(mean eigenvalue, largest eigenvalue) of a symmetric matrix, in float64."""
    t = t.double()
    return float(t.diagonal().mean()), float(torch.linalg.eigvalsh(t).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problem", default="curves-ae")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--damping", type=float, default=None, help="default: the problem's")
    args = ap.parse_args()

    problem = get_problem(args.problem)
    hps = resolve_hps(problem, "kfac", {"damping": args.damping})
    data = load_problem_data(problem, data_dir=args.data_dir)
    torch.manual_seed(args.seed)
    model = problem.build_model()
    opt = make_method_optimizer("kfac", model, hps, seed=args.seed)
    x = data.x_train
    opt.warm_start(x[i:i + problem.batch_size] for i in range(0, x.shape[0],
                                                                problem.batch_size))
    lam = float(hps["damping"])
    root = math.sqrt(lam)
    print(f"{problem.name}, {data.note}")
    print(f"KFAC lr {hps['lr']:g}, damping lambda {lam:g}; factors after the warm start from "
          f"{x.shape[0]} training samples, seed {args.seed}\n")
    head = (f"{'layer':>5} {'W shape':>11} {'pi':>9} {'Omega/(pi sqrt l)':>18} "
            f"{'Gamma/(sqrt l/pi)':>18} {'(O x G)/l mean':>15} {'(O x G)/l max':>14}")
    print(head)
    print(" " * 39 + "mean    max" + " " * 9 + "mean    max")
    for layer in opt.layers:
        st = opt.layer_state[layer.name]
        pi = float(st.pi)
        o_mean, o_max = _eig(st.Omega)
        g_mean, g_max = _eig(st.Gamma)
        shape = f"{st.Gamma.shape[0]}x{st.Omega.shape[0]}"
        print(f"{layer.name:>5} {shape:>11} {pi:9.3g} "
              f"{o_mean / (pi * root):9.2e} {o_max / (pi * root):8.2e} "
              f"{g_mean / (root / pi):9.2e} {g_max / (root / pi):8.2e} "
              f"{o_mean * g_mean / lam:15.2e} {o_max * g_max / lam:14.2e}")


if __name__ == "__main__":
    main()
