"""The paper's own numbers (Appendix B.1): HumanEval instances 20 and 24 at 0.03B-1.5B.

The table's PU values are all multiples of 1/1600, so they are read as passes out of 1,600
samples. Instance 20 has zero passes at the three smallest sizes: the least-squares path of
the paper (log(-log PU) on log N over non-zero points) drops those cells; the likelihood fit
keeps them. docs/paper-appendix-b1.md shows the numbers this test prints.
"""

import numpy as np

from passuntil.scaling.data import SeriesCounts
from passuntil.scaling.task_law import fit_instances_ls, fit_likelihood

N = np.array([0.036, 0.109, 0.241, 0.499, 0.892, 1.542]) * 1e9  # paper Table 3
PU = {"20": [0, 0, 0, 0.000625, 0.001875, 0.008125],
      "24": [0.00375, 0.05125, 0.350625, 0.3625, 0.568125, 0.796875]}


def counts(iid):
    k = np.round(np.array(PU[iid]) * 1600).astype(int)
    return SeriesCounts(N, k[None], np.full((1, N.size), 1600), 1, (iid,))


def test_instance_20_needs_the_likelihood_path(capsys):
    lines = []
    for iid in PU:
        c = counts(iid)
        for name, fit in (("least squares", fit_instances_ls(c)), ("likelihood", fit_likelihood(c, pooling=False))):
            f = fit.forecast(2.45e9)
            lines.append(f"instance {iid}, {name}: PU(2.4B) = {f.point:.4g} [{f.low:.4g}, {f.high:.4g}]")
    # hold out 1.5B: instance 20 then has only two non-zero points
    c5 = counts("20").select_models(np.arange(5))
    ls, lik = fit_instances_ls(c5).forecast(1.542e9), fit_likelihood(c5, pooling=False).forecast(1.542e9)
    lines.append(f"instance 20 from 0.03B-0.9B -> 1.5B: least squares {ls.point:.4g} [{ls.low:.4g}, {ls.high:.4g}], "
                 f"likelihood {lik.point:.4g} [{lik.low:.4g}, {lik.high:.4g}], observed 0.008125")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert (counts("20").passes > 0).sum() == 3  # least squares sees half of the sizes
    assert ls.low == 0.0  # its bootstrap refits collapse (fewer than two non-zero points) to 0
    assert 0 < lik.low <= 0.008125 <= lik.high  # the likelihood keeps the zero cells and covers the outcome
