"""Answer cells that run an exercise's reference without writing it, one way each.

Shared by `test_tripwire.py`: the in-kernel `check(...)` (as the notebooks and nbgrader run
it), the pytest grader (`moe-course grade`) and nbgrader autograde must all give each of
them 0 points. Each case is `(name, grade_id, source of the answer cell)`; the source
defines the exercise's symbol and runs in the notebook's namespace (torch, nn, F imported).
"""

from __future__ import annotations

_EXPERT_INIT = """
    def __init__(self, d_model, d_hidden):
        super().__init__()
        self.w_in = nn.Linear(d_model, d_hidden)
        self.w_out = nn.Linear(d_hidden, d_model)
"""

CASES: list[tuple[str, str, str]] = [
    # -- stored originals: a reference object kept before the check --
    ("stored alias", "ex01_softmax_gate", """
import moe_course.gating as _g
_kept = {"f": _g.softmax_gate}
def softmax_gate(x, w_gate):
    return _kept["f"](x, w_gate)
"""),
    ("the worker's stored originals", "ex02_top_k_gating", """
from moe_course.grading.autograde import worker as _w
def top_k_gating(logits, k):
    return _w._ORIGINALS["moe_course.gating.top_k_gating"](logits, k)
"""),
    ("stored bound method", "ex01_expert", """
from moe_course.experts import Expert as _E
class Expert(nn.Module):
""" + _EXPERT_INIT + """
    def forward(self, x):
        return self._impl(x)
    @property
    def _impl(self):
        return _E.forward.__get__(self)
"""),
    # -- a fresh copy of the module: importlib.reload --
    ("reload in a cell", "ex01_softmax_gate", """
import importlib
import moe_course.gating as _g
_fresh = importlib.reload(_g).softmax_gate
def softmax_gate(x, w_gate):
    return _fresh(x, w_gate)
"""),
    ("reload during the check", "ex02_top_k_gating", """
def top_k_gating(logits, k):
    import importlib
    import moe_course.gating as g
    return importlib.reload(g).top_k_gating(logits, k)
"""),
    # -- objects found through gc --
    ("gc function", "ex02_noisy_logits", """
import gc, types
_found = [o for o in gc.get_objects() if isinstance(o, types.FunctionType)
          and o.__name__ == "noisy_logits" and o.__module__ == "moe_course.gating"]
def noisy_logits(x, w_gate, w_noise, noise=None):
    return _found[-1](x, w_gate, w_noise, noise)
"""),
    ("gc referents", "ex01_dense_moe", """
import gc
import moe_course.routing as _r
_fn = [v for v in gc.get_referents(vars(_r)) if getattr(v, "__name__", "") == "dense_moe"][0]
def dense_moe(x, experts, w_gate):
    return _fn(x, experts, w_gate)
"""),
    # -- a new function object on the reference's code --
    ("FunctionType", "ex01_dense_moe", """
import types
import moe_course.routing as _r
_f = types.FunctionType(_r.dense_moe.__code__, _r.dense_moe.__globals__, "mine")
def dense_moe(x, experts, w_gate):
    return _f(x, experts, w_gate)
"""),
    ("FunctionType on renamed code", "ex02_moe_flops", """
import types
import moe_course.routing as _r
_code = _r.moe_flops.__code__.replace(co_name="flops", co_filename="mine.py",
                                      co_firstlineno=1)
_f = types.FunctionType(_code, _r.moe_flops.__globals__)
def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    return _f(n_tokens, d_model, d_hidden, n_experts, k)
"""),
    # -- a copy of the module file imported under another name --
    ("module file copied and imported", "ex02_sparse_moe", """
import importlib.util, os, shutil, tempfile
import moe_course.routing as _r
_path = os.path.join(tempfile.mkdtemp(dir="."), "my_routing.py")
shutil.copy(_r.__file__, _path)
_spec = importlib.util.spec_from_file_location("moe_course.my_routing", _path)
_mine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mine)
def sparse_moe(x, experts, weights, indices):
    return _mine.sparse_moe(x, experts, weights, indices)
"""),
    ("module source executed under another name", "ex01_softmax_gate", """
import moe_course.gating as _g
_ns = {"__name__": "moe_course.not_gating", "__package__": "moe_course"}
with open(_g.__file__) as _f:
    exec(compile(_f.read(), "not_gating.py", "exec"), _ns)
def softmax_gate(x, w_gate):
    return _ns["softmax_gate"](x, w_gate)
"""),
    # -- methods of reference classes --
    ("Expert.forward assigned", "ex01_expert", """
from moe_course.experts import Expert as _E
class Expert(nn.Module):
""" + _EXPERT_INIT + """
    forward = _E.forward
"""),
    ("Expert.__init__ and forward called", "ex01_expert", """
from moe_course import experts as _x
class Expert(nn.Module):
    def __init__(self, d_model, d_hidden):
        _x.Expert.__init__(self, d_model, d_hidden)
    def forward(self, x):
        return _x.Expert.forward(self, x)
"""),
    # -- a reference's helper that does the whole work (Exercise.helpers) --
    ("helper switch_loss_from_counts", "ex03_switch_aux_loss", """
from moe_course.losses import switch_loss_from_counts as _from_counts
def switch_aux_loss(router_probs, indices):
    counts = torch.bincount(indices.reshape(-1).long(), minlength=router_probs.shape[-1])
    return _from_counts(router_probs, counts, indices.numel()).loss
"""),
    ("helper _kth_excluding", "ex03_load_loss", """
from moe_course import losses as _l
def load_loss(clean_logits, noisy_logits, noise_std, k, w_load=0.01):
    kth, next_ = _l._kth_excluding(noisy_logits, k)
    return w_load * (clean_logits - kth).sigmoid().sum(0).var()
"""),
    # -- tampering with the profiler --
    ("sys.setprofile(None)", "ex01_softmax_gate", """
import sys
import moe_course.gating as _g
def softmax_gate(x, w_gate):
    try:
        sys.setprofile(None)
    except Exception:
        pass
    return _g.softmax_gate(x, w_gate)
"""),
    ("profiler cleared through ctypes", "ex02_moe_flops", """
import ctypes
import moe_course.routing as _r
def moe_flops(n_tokens, d_model, d_hidden, n_experts, k):
    try:
        ctypes.pythonapi.PyEval_SetProfile(None, None)
    except Exception:
        pass
    return _r.moe_flops(n_tokens, d_model, d_hidden, n_experts, k)
"""),
    ("a thread started before the check", "ex02_noisy_logits", """
import queue, threading
import moe_course.gating as _g
_jobs, _done = queue.Queue(), queue.Queue()
def _serve():
    while True:
        args = _jobs.get()
        try:
            _done.put(_g.noisy_logits(*args))
        except BaseException as exc:
            _done.put(exc)
threading.Thread(target=_serve, daemon=True).start()
def noisy_logits(x, w_gate, w_noise, noise=None):
    _jobs.put((x, w_gate, w_noise, noise))
    out = _done.get()
    if isinstance(out, BaseException):
        raise out
    return out
"""),
    ("a raw thread started during the check", "ex02_sparse_moe", """
import _thread, time
import moe_course.routing as _r
def sparse_moe(x, experts, weights, indices):
    box = []
    _thread.start_new_thread(lambda: box.append(_r.sparse_moe(x, experts, weights, indices)),
                             ())
    while not box:
        time.sleep(0.001)
    return box[0]
"""),
    # last: a foreign audit hook fails every later check of the process, by design
    ("an audit hook that runs the reference", "ex01_dense_moe", """
import sys
import moe_course.routing as _r
_seen = []
def _hook(event, args):
    if _seen and _seen[-1] is None:
        _seen[-1] = _r.dense_moe(*_seen.pop(-2))
sys.addaudithook(_hook)
def dense_moe(x, experts, w_gate):
    _seen.extend([(x, experts, w_gate), None])
    sys.audit("anything")
    return _seen.pop()
"""),
]

# Which tampering each case is (the others must fail with "implement it yourself").
TAMPERING = {"sys.setprofile(None)", "profiler cleared through ctypes",
             "an audit hook that runs the reference"}


def by_assignment(prefix: str) -> list[dict[str, str]]:
    """The cases of one notebook packed into as few submissions as possible: each is
    {grade_id: source}, one case per exercise."""
    packs: list[dict[str, str]] = []
    for _name, grade_id, source in CASES:
        if not grade_id.startswith(prefix):
            continue
        pack = next((p for p in packs if grade_id not in p), None)
        if pack is None:
            pack = {}
            packs.append(pack)
        pack[grade_id] = source
    return packs
