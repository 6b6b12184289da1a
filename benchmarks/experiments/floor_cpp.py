"""The training floor with a C++ autograd op instead of compare.py's Python autograd.Function.

compare.py's `floor (empty op)` row is a Python torch.autograd.Function; FusedLSTM's own
autograd is C++, so that floor could overstate what is unavoidable. This script times the same
call structure with a C++ torch::autograd::Function that computes nothing (11 leaves requiring
grad: x, h0, c0 and the 8 weights; outputs and gradients torch::empty) next to nn.LSTM, at the
two tutorial sizes, 2 threads, median of 15 blocks of 200 calls, and prints nn.LSTM's time over
it: the largest training speedup any implementation behind PyTorch's autograd can show.
Usage: python benchmarks/experiments/floor_cpp.py (compiles a small extension first, ~40 s).
The run at df3fb04 (benchmarks/notes/runs.md, "Runs at df3fb04 (2026-11-21)"): 85-86 us,
ceilings 8.9x and 7.8x."""
import sys, timeit, torch
from torch import nn
from torch.utils.cpp_extension import load_inline
src = r'''
#include <torch/extension.h>
using torch::autograd::AutogradContext; using torch::autograd::variable_list;
struct Empty : public torch::autograd::Function<Empty> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor h0, at::Tensor c0, std::vector<at::Tensor> w) {
    std::vector<at::Tensor> save{x, h0, c0}; for (auto& t : w) save.push_back(t);
    ctx->save_for_backward(save);
    return {at::empty({x.size(0), x.size(1), h0.size(2)}, x.options()), at::empty_like(h0), at::empty_like(c0)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    auto saved = ctx->get_saved_variables();
    variable_list out; out.push_back(at::empty_like(saved[0])); out.push_back(at::empty_like(saved[1])); out.push_back(at::empty_like(saved[2]));
    // the weights come as one list argument: autograd wants one grad per input; a list input is not differentiable in this API,
    // so weights are passed as separate inputs below instead.
    return out;
  }
};
struct Empty11 : public torch::autograd::Function<Empty11> {
  static variable_list forward(AutogradContext* ctx, at::Tensor x, at::Tensor h0, at::Tensor c0,
      at::Tensor w0, at::Tensor w1, at::Tensor w2, at::Tensor w3, at::Tensor w4, at::Tensor w5, at::Tensor w6, at::Tensor w7) {
    ctx->save_for_backward({x, h0, c0, w0, w1, w2, w3, w4, w5, w6, w7});
    return {at::empty({x.size(0), x.size(1), h0.size(2)}, x.options()), at::empty_like(h0), at::empty_like(c0)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    variable_list out; for (auto& t : ctx->get_saved_variables()) out.push_back(at::empty_like(t));
    return out;
  }
};
std::vector<at::Tensor> empty_lstm(at::Tensor x, at::Tensor h0, at::Tensor c0, std::vector<at::Tensor> w) {
  return Empty11::apply(x, h0, c0, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]);
}
'''
m = load_inline('cfloor', src, functions=['empty_lstm'], extra_cflags=['-O2'], verbose=False)
torch.set_num_threads(2)
W = {'seed-tiny': (1,3,2,4,92), 'small': (5,10,2,3,10)}
class CFloor(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        for n, p in lstm.named_parameters(): self.register_parameter(n, nn.Parameter(p.detach().clone()))
        self.names = list(lstm._flat_weights_names)
    def forward(self, x, hx):
        p = self._parameters
        o, h, c = m.empty_lstm(x, hx[0], hx[1], [p[n] for n in self.names])
        return o, (h, c)
for name, (I,H,L,T,B) in W.items():
    lstm = nn.LSTM(I,H,L); fl = CFloor(lstm)
    x = torch.randn(T,B,I, requires_grad=True); h0 = torch.randn(L,B,H, requires_grad=True); c0 = torch.randn(L,B,H, requires_grad=True)
    up = (torch.randn(T,B,H), torch.randn(L,B,H), torch.randn(L,B,H))
    def step(mod):
        def f():
            o, (h, c) = mod(x, (h0, c0)); torch.autograd.backward((o, h, c), up)
        return f
    res = {}
    for k, mod in (('nn.LSTM', lstm), ('C++ empty op', fl)):
        f = step(mod); f()
        res[k] = sorted(timeit.repeat(f, number=200, repeat=15))[7] / 200 * 1e6
    print(f"{name} train: nn.LSTM {res['nn.LSTM']:.1f} us, C++ empty-op floor {res['C++ empty op']:.1f} us, ceiling {res['nn.LSTM']/res['C++ empty op']:.2f}x")
