"""The collector's history of a run against float64 references from weights saved at every step."""

from __future__ import annotations

from reference import angle, cosine_distance, rel_err

from layrot.client.http_query import HttpQueryClient, is_http_address
from layrot.client.query import QueryClient

TOL = 1e-6  # relative, where the value is not tiny
TINY = 1e-9


def check_history(address: str, run: str, w0, saved, steps: list[int], tol: float = TOL, tiny: float = TINY):
    """The collector's rotation and step angle at ``steps`` vs float64 references from the saved weights.

    ``address`` is the collector's gRPC address, or its HTTP port (``http://...``) to read the history there.
    """
    hist = (HttpQueryClient(address) if is_http_address(address) else QueryClient(address)).history(run)
    assert list(hist.steps) == steps
    worst = [0.0, 0.0]
    for k, t in enumerate(steps):
        prev = w0 if t == 1 else saved[t - 1]
        for l, name in enumerate(hist.layer_names):
            w = saved[t][name].numpy()
            rot = cosine_distance(w0[name].numpy(), w)
            ang = angle(prev[name].numpy(), w)
            if rot > tiny:
                worst[0] = max(worst[0], float(rel_err(hist.rotation[k, l], rot)))
                assert rel_err(hist.rotation[k, l], rot) <= tol, (t, name, hist.rotation[k, l], rot)
            if ang > tiny:
                worst[1] = max(worst[1], float(rel_err(hist.step_angle[k, l], ang)))
                assert rel_err(hist.step_angle[k, l], ang) <= tol, (t, name, hist.step_angle[k, l], ang)
    print(f"{run}: max relative error rotation {worst[0]:.2e}, step angle {worst[1]:.2e}")
    return hist
