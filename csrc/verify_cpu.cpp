// Multi-step SSM verification on the CPU (semantics: vllm_mamba_hybrid/ops/verify.py).
//
// One task per (sequence, head) for Mamba2 and per (sequence, channel block) for
// Mamba1, spread over torch's intra-op threads. Each task sweeps its slice of the
// fp32 state once: every state row is read, advanced over the replayed tokens,
// written back (the new checkpoint) and, while it is still in registers/L1, used
// for the outputs of the k+1 new tokens, whose own states are never stored. Inner
// loops are vectorised by the compiler: over the contiguous state axis for Mamba2,
// over 16 channels (lanes) for Mamba1 (mamba1_lanes).
//
// Mamba2 uses the SSD block form (its decay is one scalar per head and token), so
// per state element the work is one FMA per replayed token and one per new token:
//   replay   S <- exp(sum dA) S + sum_t w_t x_t (outer) B_t,  w_t = dt_t exp(sum_{s>t} dA_s)
//   outputs  y_t = exp(cum_t) C_t.S + sum_{s<=t} exp(cum_t - cum_s) dt_s (C_t.B_s) x_s + D x_t
// Mamba1's decay differs per (channel, state) element, so it steps token by token.
//
// ssm_spec_step serves vLLM's own verify contract instead (every candidate's state
// stored to its cache block), for the mixers inside the vLLM engine.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace {

// exp for the vectorised inner loops (std::exp stays scalar there): 2^k * p(r) with
// x = k ln2 + r, |r| <= ln2/2 and p the degree-6 Taylor polynomial (rel. error ~2e-7,
// below float32 rounding of the state sums). Plain arithmetic only (no libm calls), so
// the compiler inlines it into vector code; inputs are clamped to float's range.
inline float exp_simd(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float kf = (x * 1.44269504f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (x - kf * 0.693145752f) - kf * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float dt_eff(float dt, float bias, bool softplus) {
  float v = dt + bias;
  return softplus ? (v <= 20.f ? std::log1p(std::exp(v)) : v) : v;
}

constexpr int64_t kMaxState = 256;  // Mamba1 d_state bound of the on-stack state buffers

// Inputs as float32 and contiguous (they are small next to the state).
torch::Tensor f32(const torch::Tensor& t) { return t.to(torch::kFloat32).contiguous(); }

void check_state(const torch::Tensor& state, int64_t dims, const char* what) {
  TORCH_CHECK(state.device().is_cpu() && state.scalar_type() == torch::kFloat32,
              what, ": state must be a float32 CPU tensor");
  TORCH_CHECK(state.dim() == dims && state.stride(-1) == 1,
              what, ": state must have ", dims, " dims and a contiguous last axis");
}

// Every input is read through raw pointers: a wrong shape must fail here, by name.
void expect(const torch::Tensor& t, std::vector<int64_t> shape, const char* what,
            const char* name) {
  TORCH_CHECK(t.device().is_cpu(), what, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), what, ": ", name, " has shape ", t.sizes(),
              ", expected ", c10::IntArrayRef(shape));
}

void expect(const c10::optional<torch::Tensor>& t, std::vector<int64_t> shape, const char* what,
            const char* name) {
  if (t) expect(*t, std::move(shape), what, name);
}

// Slots of active rows must lie in the state; inactive rows are < 0.
void check_slots(const torch::Tensor& idx, int64_t slots, const char* what) {
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < idx.numel(); ++b)
    TORCH_CHECK(p[b] < slots, what, ": state_idx[", b, "] = ", p[b], " but the state has ",
                slots, " slots");
}

// Mamba2's state rows are swept kChunk values at a time (one AVX-512 vector).
constexpr int64_t kChunk = 16;
// Rows are compiled for each new-token count up to kMaxFixedT (k <= 15), so the T
// readout accumulators are registers; longer blocks keep them in memory.
constexpr int64_t kMaxFixedT = 16;
// A head's rows are prefetched this many rows (4 x 512 bytes at d_state 128) ahead of
// the one being swept: its arithmetic then overlaps the next rows' memory traffic
// (k >= 4: 1.04-1.17x, k <= 2: 0.94-1.12x at batch 1 and 8 in three side-by-side runs,
// benchmarks/results/kernels_cpu_run7_mamba2_prefetch_ab.json).
constexpr int64_t kPrefetchRows = 4;

inline void prefetch_row(const float* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(float)); off += 64)
    __builtin_prefetch(bytes + off, 1, 3);  // for writing: the row is stored back
}

// kLen values of a state row, held in registers: the nr replayed tokens are applied
// (the decay with the first), the chunk is stored back if it changed, and its products
// with each new token's C are added to acc (T x kChunk): one pass over the row serves
// the replay and all readouts (before: a pass per token, each readout one dependent
// chain of FMAs). kT: T when known at compile time, else 0.
template <int64_t kLen, int64_t kT>
inline void mamba2_chunk(float* row, const float* rB, int64_t rB_t, const float* coef, int64_t nr,
                         float decay, const float* C, int64_t C_t, int64_t T, float* acc) {
  float v[kChunk];
#pragma omp simd
  for (int64_t j = 0; j < kLen; ++j) v[j] = row[j];
  if (nr > 0) {
#pragma omp simd
    for (int64_t j = 0; j < kLen; ++j) v[j] = v[j] * decay + coef[0] * rB[j];
    for (int64_t t = 1; t < nr; ++t) {
      const float c = coef[t];
      const float* Bt = rB + t * rB_t;
#pragma omp simd
      for (int64_t j = 0; j < kLen; ++j) v[j] += c * Bt[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < kLen; ++j) row[j] = v[j];
  }
  for (int64_t t = 0; t < (kT ? kT : T); ++t) {
    const float* Ct = C + t * C_t;
    float* at = acc + t * kChunk;
#pragma omp simd
    for (int64_t j = 0; j < kLen; ++j) at[j] += v[j] * Ct[j];
  }
}

// One state row of length N (full chunks, then the N % kChunk values left one at a
// time); dots[t] = C_t . (the row after the replay).
template <int64_t kT>
void mamba2_row(float* row, int64_t N, const float* rB, int64_t rB_t, const float* coef, int64_t nr,
                float decay, const float* C, int64_t C_t, int64_t T, float* acc_mem, float* dots) {
  float acc_reg[kT ? kT * kChunk : 1] = {};
  float* acc = kT ? acc_reg : acc_mem;
  if (!kT) std::fill(acc, acc + T * kChunk, 0.f);
  int64_t n0 = 0;
  for (; n0 + kChunk <= N; n0 += kChunk)
    mamba2_chunk<kChunk, kT>(row + n0, rB + n0, rB_t, coef, nr, decay, C + n0, C_t, T, acc);
  for (; n0 < N; ++n0)
    mamba2_chunk<1, kT>(row + n0, rB + n0, rB_t, coef, nr, decay, C + n0, C_t, T, acc);
  for (int64_t t = 0; t < (kT ? kT : T); ++t) {
    const float* at = acc + t * kChunk;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < kChunk; ++j) dot += at[j];
    dots[t] = dot;
  }
}

using Mamba2RowFn = void (*)(float*, int64_t, const float*, int64_t, const float*, int64_t, float,
                             const float*, int64_t, int64_t, float*, float*);

template <size_t... I>
constexpr std::array<Mamba2RowFn, sizeof...(I) + 1> mamba2_row_table(std::index_sequence<I...>) {
  return {&mamba2_row<0>, &mamba2_row<static_cast<int64_t>(I) + 1>...};
}

// mamba2_row for T new tokens: the compiled count where there is one, else the general row.
Mamba2RowFn mamba2_row_for(int64_t T) {
  static constexpr auto table = mamba2_row_table(std::make_index_sequence<kMaxFixedT>{});
  return T >= 1 && T <= kMaxFixedT ? table[T] : table[0];
}

torch::Tensor mamba2_verify(torch::Tensor state, torch::Tensor state_idx, torch::Tensor replay_x,
                            torch::Tensor replay_dt, torch::Tensor replay_B,
                            torch::Tensor num_replay, torch::Tensor x, torch::Tensor dt,
                            torch::Tensor A, torch::Tensor B, torch::Tensor C,
                            c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> dt_bias,
                            bool dt_softplus) {
  check_state(state, 4, "mamba2_verify");
  const int64_t batch = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t N = state.size(3), R = replay_x.size(1);
  const int64_t gB = B.size(2), gC = C.size(2);
  TORCH_CHECK(state.size(1) == H && state.size(2) == P, "mamba2_verify: state ",
              state.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(H % gB == 0 && H % gC == 0, "mamba2_verify: heads must be a multiple of groups");
  const char* op = "mamba2_verify";
  expect(state_idx, {batch}, op, "state_idx");
  expect(num_replay, {batch}, op, "num_replay");
  expect(replay_x, {batch, R, H, P}, op, "replay_x");
  expect(replay_dt, {batch, R, H}, op, "replay_dt");
  expect(replay_B, {batch, R, gB, N}, op, "replay_B");
  expect(dt, {batch, T, H}, op, "dt");
  expect(B, {batch, T, gB, N}, op, "B");
  expect(C, {batch, T, gC, N}, op, "C");
  expect(A, {H}, op, "A");
  expect(D, {H}, op, "D");
  expect(dt_bias, {H}, op, "dt_bias");
  auto idx = state_idx.to(torch::kLong).contiguous();
  check_slots(idx, state.size(0), op);
  auto nrep = num_replay.to(torch::kLong).contiguous();
  auto rx = f32(replay_x), rdt = f32(replay_dt), rB = f32(replay_B);
  auto xf = f32(x), dtf = f32(dt), Bf = f32(B), Cf = f32(C), Af = f32(A);
  auto Df = D ? f32(*D) : torch::Tensor(), dtbf = dt_bias ? f32(*dt_bias) : torch::Tensor();
  auto y = torch::zeros({batch, T, H, P}, xf.options());

  const int64_t* idx_p = idx.data_ptr<int64_t>();
  const int64_t* nrep_p = nrep.data_ptr<int64_t>();
  const float *rx_p = rx.data_ptr<float>(), *rdt_p = rdt.data_ptr<float>(),
              *rB_p = rB.data_ptr<float>(), *x_p = xf.data_ptr<float>(),
              *dt_p = dtf.data_ptr<float>(), *B_p = Bf.data_ptr<float>(),
              *C_p = Cf.data_ptr<float>(), *A_p = Af.data_ptr<float>();
  const float* D_p = D ? Df.data_ptr<float>() : nullptr;
  const float* dtb_p = dt_bias ? dtbf.data_ptr<float>() : nullptr;
  float* y_p = y.data_ptr<float>();
  float* st_p = state.data_ptr<float>();
  const int64_t s_slot = state.stride(0), s_h = state.stride(1), s_p = state.stride(2);

  const Mamba2RowFn row_fn = mamba2_row_for(T);
  at::parallel_for(0, batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(R), cum(T), ecum(T), dte(T), G(T * T), coef(R), acc(T * kChunk),
        row_dots(T), dots(T * P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const int64_t slot = idx_p[b];
      if (slot < 0) continue;  // finished / padding row: outputs stay zero
      const float a = A_p[h], bias = dtb_p ? dtb_p[h] : 0.f, d_skip = D_p ? D_p[h] : 0.f;
      const int64_t nr = nrep_p[b];
      TORCH_CHECK(nr >= 0 && nr <= R, "mamba2_verify: num_replay out of range");
      // replay weights: w_t = dt_t * exp(sum_{s>t} dt_s A)
      float total = 0.f;
      for (int64_t t = 0; t < nr; ++t) {
        w[t] = dt_eff(rdt_p[(b * R + t) * H + h], bias, dt_softplus);
        total += w[t] * a;
      }
      float tail = 0.f;
      for (int64_t t = nr - 1; t >= 0; --t) {
        const float d = w[t];
        w[t] = d * std::exp(tail);
        tail += d * a;
      }
      const float decay = std::exp(total);
      // new tokens: cum_t, and G[t][s] = exp(cum_t - cum_s) dt_s (C_t . B_s) for s <= t
      float c = 0.f;
      for (int64_t t = 0; t < T; ++t) {
        dte[t] = dt_eff(dt_p[(b * T + t) * H + h], bias, dt_softplus);
        c += dte[t] * a;
        cum[t] = c;
        ecum[t] = std::exp(c);
      }
      const float* Cb = C_p + (b * T * gC + h / (H / gC)) * N;
      const float* Bb = B_p + (b * T * gB + h / (H / gB)) * N;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t s = 0; s <= t; ++s) {
          const float* Ct = Cb + t * gC * N;
          const float* Bs = Bb + s * gB * N;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t n = 0; n < N; ++n) dot += Ct[n] * Bs[n];
          G[t * T + s] = std::exp(cum[t] - cum[s]) * dte[s] * dot;
        }
      }
      const float* rBb = rB_p + (b * R * gB + h / (H / gB)) * N;
      float* head = st_p + slot * s_slot + h * s_h;
      for (int64_t p = 0; p < P; ++p) {
        if (p + kPrefetchRows < P) prefetch_row(head + (p + kPrefetchRows) * s_p, N);
        for (int64_t t = 0; t < nr; ++t) coef[t] = w[t] * rx_p[((b * R + t) * H + h) * P + p];
        row_fn(head + p * s_p, N, rBb, gB * N, coef.data(), nr, decay,
               Cb, gC * N, T, acc.data(), row_dots.data());
        for (int64_t t = 0; t < T; ++t) dots[t * P + p] = row_dots[t];
      }
      // outputs, vectorised over the head's rows p (x and y are contiguous in p)
      for (int64_t t = 0; t < T; ++t) {
        float* yt = y_p + ((b * T + t) * H + h) * P;
        const float* xt = x_p + ((b * T + t) * H + h) * P;
        const float* dot_t = dots.data() + t * P;
        const float e = ecum[t];
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) yt[p] = e * dot_t[p] + d_skip * xt[p];
        for (int64_t s = 0; s <= t; ++s) {
          const float g = G[t * T + s];
          const float* xs = x_p + ((b * T + s) * H + h) * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) yt[p] += g * xs[p];
        }
      }
    }
  });
  return y.to(x.scalar_type());
}

// Mamba1's operands, float32 and contiguous, for mamba1_lanes.
struct Mamba1Io {
  const float *rx, *rdt, *rB, *x, *dt, *B, *C, *D, *z;  // dt, rdt: softplus'd; z: silu'd
  const float* A;  // (channel blocks, N, kLanes): A transposed per block, padding lanes 0
  float *y, *state;
  int64_t R, T, Dm, N, gB, gC, s_slot, s_d;
};

// Channels per vector: Mamba1 steps kLanes channels in the lanes of one vector, with
// the state transposed to (d_state, channel). Stepped one channel at a time (its 16
// states one vector) every token was one dependent chain of exp, FMA and a horizontal
// sum; across channels the d_state chains are independent and the output sum over n
// is plain FMAs.
constexpr int64_t kLanes = 16;

// B or C of lane l at state n: one group for all lanes (kUniform), else per lane.
template <bool kUniform>
inline float group_value(const float* base, const int64_t* off, int64_t l, int64_t n) {
  return kUniform ? base[off[0] + n] : base[off[l] + n];
}

// Replays sequence b's accepted tokens on channels d .. d + kLanes - 1 (those < Dm),
// stores their new checkpoint rows, then writes the outputs of the new tokens.
template <bool kUniform>
void mamba1_lanes(const Mamba1Io& io, int64_t b, int64_t slot, int64_t nr, int64_t d) {
  const int64_t N = io.N, R = io.R, T = io.T, Dm = io.Dm;
  const int64_t lanes = std::min(kLanes, Dm - d);
  alignas(64) float S[kMaxState][kLanes];
  alignas(64) float delta[kLanes], coef[kLanes], dot[kLanes];
  int64_t offB[kLanes], offC[kLanes];
  const float(*A)[kLanes] = reinterpret_cast<const float(*)[kLanes]>(io.A + d * N);
  float* rows = io.state + slot * io.s_slot + d * io.s_d;  // channel d's row; l's at l * s_d
  if (lanes == kLanes) {  // a transposing gather (one instruction per n with AVX-512)
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) S[n][l] = rows[l * io.s_d + n];
    }
  } else {  // padding lanes: zero state and inputs
    for (int64_t l = 0; l < kLanes; ++l)
      for (int64_t n = 0; n < N; ++n) S[n][l] = l < lanes ? rows[l * io.s_d + n] : 0.f;
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    const int64_t c = l < lanes ? d + l : d;
    offB[l] = c / (Dm / io.gB) * N;
    offC[l] = c / (Dm / io.gC) * N;
  }
  for (int64_t t = 0; t < nr; ++t) {
    const int64_t row = (b * R + t) * Dm + d;
    for (int64_t l = 0; l < kLanes; ++l) {
      delta[l] = l < lanes ? io.rdt[row + l] : 0.f;
      coef[l] = l < lanes ? delta[l] * io.rx[row + l] : 0.f;
    }
    const float* Bt = io.rB + (b * R + t) * io.gB * N;
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l)
        S[n][l] = S[n][l] * exp_simd(delta[l] * A[n][l])
                  + coef[l] * group_value<kUniform>(Bt, offB, l, n);
    }
  }
  if (lanes == kLanes) {
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) rows[l * io.s_d + n] = S[n][l];
    }
  } else {
    for (int64_t l = 0; l < lanes; ++l)
      for (int64_t n = 0; n < N; ++n) rows[l * io.s_d + n] = S[n][l];
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t row = (b * T + t) * Dm + d;
    for (int64_t l = 0; l < kLanes; ++l) {
      delta[l] = l < lanes ? io.dt[row + l] : 0.f;
      coef[l] = l < lanes ? delta[l] * io.x[row + l] : 0.f;
      dot[l] = 0.f;
    }
    const float* Bt = io.B + (b * T + t) * io.gB * N;
    const float* Ct = io.C + (b * T + t) * io.gC * N;
    for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        S[n][l] = S[n][l] * exp_simd(delta[l] * A[n][l])
                  + coef[l] * group_value<kUniform>(Bt, offB, l, n);
        dot[l] += S[n][l] * group_value<kUniform>(Ct, offC, l, n);
      }
    }
    for (int64_t l = 0; l < lanes; ++l) {
      const float xv = io.x[row + l];
      float out = dot[l] + (io.D ? io.D[d + l] * xv : 0.f);
      if (io.z) out *= io.z[row + l];
      io.y[row + l] = out;
    }
  }
}

torch::Tensor mamba1_verify(torch::Tensor state, torch::Tensor state_idx, torch::Tensor replay_x,
                            torch::Tensor replay_dt, torch::Tensor replay_B,
                            torch::Tensor num_replay, torch::Tensor x, torch::Tensor dt,
                            torch::Tensor A, torch::Tensor B, torch::Tensor C,
                            c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                            c10::optional<torch::Tensor> dt_bias, bool dt_softplus) {
  check_state(state, 3, "mamba1_verify");
  const int64_t batch = x.size(0), T = x.size(1), Dm = x.size(2);
  const int64_t N = state.size(2), R = replay_x.size(1);
  const int64_t gB = B.size(2), gC = C.size(2);
  TORCH_CHECK(state.size(1) == Dm && A.size(0) == Dm && A.size(1) == N,
              "mamba1_verify: state ", state.sizes(), " / A ", A.sizes(), " do not match x ",
              x.sizes());
  TORCH_CHECK(Dm % gB == 0 && Dm % gC == 0, "mamba1_verify: channels must be a multiple of groups");
  TORCH_CHECK(N <= kMaxState, "mamba1_verify: d_state ", N, " > ", kMaxState);
  const char* op = "mamba1_verify";
  expect(state_idx, {batch}, op, "state_idx");
  expect(num_replay, {batch}, op, "num_replay");
  expect(replay_x, {batch, R, Dm}, op, "replay_x");
  expect(replay_dt, {batch, R, Dm}, op, "replay_dt");
  expect(replay_B, {batch, R, gB, N}, op, "replay_B");
  expect(dt, {batch, T, Dm}, op, "dt");
  expect(B, {batch, T, gB, N}, op, "B");
  expect(C, {batch, T, gC, N}, op, "C");
  expect(z, {batch, T, Dm}, op, "z");
  expect(D, {Dm}, op, "D");
  expect(dt_bias, {Dm}, op, "dt_bias");
  auto idx = state_idx.to(torch::kLong).contiguous();
  check_slots(idx, state.size(0), op);
  auto nrep = num_replay.to(torch::kLong).contiguous();
  auto rx = f32(replay_x), rB = f32(replay_B);
  auto xf = f32(x), Bf = f32(B), Cf = f32(C);
  const int64_t blocks = (Dm + kLanes - 1) / kLanes;
  auto A_pad = Dm % kLanes ? torch::constant_pad_nd(f32(A), {0, 0, 0, blocks * kLanes - Dm})
                           : f32(A);
  auto A_lanes = A_pad.view({blocks, kLanes, N}).transpose(1, 2).contiguous();
  auto Df = D ? f32(*D) : torch::Tensor();
  // Per-(token, channel) scalars with ATen's vectorised ops: dt -> softplus(dt + bias)
  // (threshold 20, as the reference), z -> silu(z).
  auto delta_of = [&](const torch::Tensor& t) {
    auto v = dt_bias ? t.to(torch::kFloat32) + f32(*dt_bias) : t.to(torch::kFloat32);
    return (dt_softplus ? torch::softplus(v) : v).contiguous();
  };
  auto rdt = delta_of(replay_dt), dtf = delta_of(dt);
  auto zf = z ? torch::silu(f32(*z)).contiguous() : torch::Tensor();
  auto y = torch::zeros({batch, T, Dm}, xf.options());

  const Mamba1Io io{rx.data_ptr<float>(), rdt.data_ptr<float>(), rB.data_ptr<float>(),
                    xf.data_ptr<float>(), dtf.data_ptr<float>(), Bf.data_ptr<float>(),
                    Cf.data_ptr<float>(), D ? Df.data_ptr<float>() : nullptr,
                    z ? zf.data_ptr<float>() : nullptr, A_lanes.data_ptr<float>(),
                    y.data_ptr<float>(), state.data_ptr<float>(),
                    R, T, Dm, N, gB, gC, state.stride(0), state.stride(1)};
  const int64_t* idx_p = idx.data_ptr<int64_t>();
  const int64_t* nrep_p = nrep.data_ptr<int64_t>();
  // A block's lanes read one B (C) group when the group spans the block: a broadcast
  // then, a gather across groups otherwise.
  const bool uniform = (Dm / gB) % kLanes == 0 && (Dm / gC) % kLanes == 0;

  at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, d = (task % blocks) * kLanes;
      const int64_t slot = idx_p[b];
      if (slot < 0) continue;
      const int64_t nr = nrep_p[b];
      TORCH_CHECK(nr >= 0 && nr <= R, "mamba1_verify: num_replay out of range");
      if (uniform)
        mamba1_lanes<true>(io, b, slot, nr, d);
      else
        mamba1_lanes<false>(io, b, slot, nr, d);
    }
  });
  return y.to(x.scalar_type());
}


// vLLM's speculative verify contract (model_executor/ssm_ops.py, SpecDecode): row b's
// tokens starts[b] .. starts[b]+lens[b]-1 start from the state in block src[b]; the state
// after its token t is stored to block dst[b][t] (0 = vLLM's null block: not stored).
// One task per (row, head) keeps each state row in a local buffer across the tokens, so
// a call reads every state once and makes no per-token gathers or Python round trips.
// x: (tokens, H, P); B, C: (tokens, H, N); z: (tokens, H, P) or none; per (h, p)
// (Mamba1): dt (tokens, H, P), A (H, P, N), D and dt_bias (H, P); per_head (Mamba2, one
// decay per head and token): dt (tokens, H, 1), A (H, 1, 1), D and dt_bias (H, 1).
torch::Tensor ssm_spec_step(torch::Tensor state, torch::Tensor src, torch::Tensor dst,
                            torch::Tensor starts, torch::Tensor lens, torch::Tensor x,
                            torch::Tensor dt, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                            torch::Tensor D, torch::Tensor dt_bias,
                            c10::optional<torch::Tensor> z, bool per_head) {
  const char* op = "ssm_spec_step";
  check_state(state, 4, op);
  const int64_t tokens = x.size(0), H = x.size(1), P = x.size(2), N = state.size(3);
  const int64_t rows = src.size(0), T = dst.size(1);
  TORCH_CHECK(state.size(1) == H && state.size(2) == P, op, ": state ", state.sizes(),
              " does not match x ", x.sizes());
  TORCH_CHECK(N <= kMaxState, op, ": d_state ", N, " > ", kMaxState);
  expect(dst, {rows, T}, op, "dst");
  expect(starts, {rows}, op, "starts");
  expect(lens, {rows}, op, "lens");
  const int64_t Pp = per_head ? 1 : P, Na = per_head ? 1 : N;
  expect(dt, {tokens, H, Pp}, op, "dt");
  expect(A, {H, Pp, Na}, op, "A");
  expect(B, {tokens, H, N}, op, "B");
  expect(C, {tokens, H, N}, op, "C");
  expect(D, {H, Pp}, op, "D");
  expect(dt_bias, {H, Pp}, op, "dt_bias");
  expect(z, {tokens, H, P}, op, "z");
  auto src_l = src.to(torch::kLong).contiguous(), dst_l = dst.to(torch::kLong).contiguous();
  auto st_l = starts.to(torch::kLong).contiguous(), len_l = lens.to(torch::kLong).contiguous();
  const int64_t *src_p = src_l.data_ptr<int64_t>(), *dst_p = dst_l.data_ptr<int64_t>(),
                *st_p = st_l.data_ptr<int64_t>(), *len_p = len_l.data_ptr<int64_t>();
  const int64_t blocks = state.size(0);
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(src_p[b] >= 0 && src_p[b] < blocks, op, ": src[", b, "] = ", src_p[b],
                " outside the state's ", blocks, " blocks");
    TORCH_CHECK(len_p[b] >= 0 && len_p[b] <= T && st_p[b] >= 0 && st_p[b] + len_p[b] <= tokens,
                op, ": row ", b, " (start ", st_p[b], ", ", len_p[b], " tokens) outside the ",
                tokens, " tokens or the ", T, " dst columns");
    for (int64_t t = 0; t < len_p[b]; ++t)
      TORCH_CHECK(dst_p[b * T + t] >= 0 && dst_p[b * T + t] < blocks, op, ": dst[", b, "][", t,
                  "] = ", dst_p[b * T + t], " outside the state's ", blocks, " blocks");
  }
  auto xf = f32(x), dtf = f32(dt), Af = f32(A), Bf = f32(B), Cf = f32(C), Df = f32(D),
       dtbf = f32(dt_bias), zf = z ? f32(*z) : torch::Tensor();
  const float *x_p = xf.data_ptr<float>(), *dt_p = dtf.data_ptr<float>(),
              *A_p = Af.data_ptr<float>(), *B_p = Bf.data_ptr<float>(),
              *C_p = Cf.data_ptr<float>(), *D_p = Df.data_ptr<float>(),
              *dtb_p = dtbf.data_ptr<float>(), *z_p = z ? zf.data_ptr<float>() : nullptr;
  auto y = torch::zeros({tokens, H, P}, xf.options());
  float* y_p = y.data_ptr<float>();
  float* s_p = state.data_ptr<float>();
  const int64_t s_blk = state.stride(0), s_h = state.stride(1), s_row = state.stride(2);

  at::parallel_for(0, rows * H, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float s[kMaxState];
    alignas(64) float dA[kMaxState];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, t0 = st_p[b], len = len_p[b];
      for (int64_t p = 0; p < P; ++p) {
        const int64_t hp = h * Pp + (per_head ? 0 : p);
        const float* from = s_p + src_p[b] * s_blk + h * s_h + p * s_row;
        for (int64_t n = 0; n < N; ++n) s[n] = from[n];
        for (int64_t t = 0; t < len; ++t) {
          const int64_t tok = t0 + t, i = (tok * H + h) * P + p;
          const float d = dt_eff(dt_p[tok * H * Pp + hp], dtb_p[hp], true);
          const float dx = d * x_p[i];
          const float* Bt = B_p + (tok * H + h) * N;
          const float* Ct = C_p + (tok * H + h) * N;
          const float* Ah = A_p + hp * Na;
          if (per_head) {
            const float decay = std::exp(d * Ah[0]);
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) dA[n] = decay;
          } else {
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) dA[n] = exp_simd(d * Ah[n]);
          }
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t n = 0; n < N; ++n) {
            s[n] = s[n] * dA[n] + dx * Bt[n];
            dot += s[n] * Ct[n];
          }
          float out = dot + D_p[hp] * x_p[i];
          if (z_p) out *= z_p[i] / (1.f + std::exp(-z_p[i]));
          y_p[i] = out;
          const int64_t blk = dst_p[b * T + t];
          if (blk > 0) {
            float* to = s_p + blk * s_blk + h * s_h + p * s_row;
            for (int64_t n = 0; n < N; ++n) to[n] = s[n];
          }
        }
      }
    }
  });
  return y;
}

// The causal conv of a verify step under the same contract (SpecDecode): row b's tokens
// starts[b] .. starts[b]+lens[b]-1 continue the window that starts at column a-1
// (a = num_accepted[b]) of the widened buffer in block blk[b] (0: null block, row skipped,
// outputs 0); afterwards columns 0 .. W-2+lens[b] hold the window shifted past the row's
// tokens, so the next step finds its start at its own a-1. x: (tokens, dim) float32;
// conv_state: (blocks, dim, L) float32, any strides; weight: (dim, W). Returns (tokens, dim).
torch::Tensor conv_spec_step(torch::Tensor x, torch::Tensor conv_state, torch::Tensor blk,
                             torch::Tensor num_accepted, torch::Tensor starts,
                             torch::Tensor lens, torch::Tensor weight,
                             c10::optional<torch::Tensor> bias, bool silu) {
  const char* op = "conv_spec_step";
  TORCH_CHECK(conv_state.device().is_cpu() && conv_state.scalar_type() == torch::kFloat32 &&
                  conv_state.dim() == 3,
              op, ": conv_state must be a 3-d float32 CPU tensor, got ", conv_state.sizes(),
              " ", conv_state.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be (tokens, dim), got ", x.sizes());
  const int64_t tokens = x.size(0), dim = x.size(1), rows = blk.size(0);
  const int64_t blocks = conv_state.size(0), L = conv_state.size(2), W = weight.size(-1);
  TORCH_CHECK(conv_state.size(1) == dim, op, ": conv_state ", conv_state.sizes(),
              " does not match x ", x.sizes());
  expect(weight, {dim, W}, op, "weight");
  expect(bias, {dim}, op, "bias");
  expect(num_accepted, {rows}, op, "num_accepted");
  expect(starts, {rows}, op, "starts");
  expect(lens, {rows}, op, "lens");
  auto blk_l = blk.to(torch::kLong).contiguous(), acc_l = num_accepted.to(torch::kLong).contiguous();
  auto st_l = starts.to(torch::kLong).contiguous(), len_l = lens.to(torch::kLong).contiguous();
  const int64_t *blk_p = blk_l.data_ptr<int64_t>(), *acc_p = acc_l.data_ptr<int64_t>(),
                *st_p = st_l.data_ptr<int64_t>(), *len_p = len_l.data_ptr<int64_t>();
  for (int64_t b = 0; b < rows; ++b) {
    TORCH_CHECK(blk_p[b] >= 0 && blk_p[b] < blocks, op, ": blk[", b, "] = ", blk_p[b],
                " outside the conv state's ", blocks, " blocks");
    TORCH_CHECK(len_p[b] >= 0 && st_p[b] >= 0 && st_p[b] + len_p[b] <= tokens, op, ": row ", b,
                " (start ", st_p[b], ", ", len_p[b], " tokens) outside the ", tokens, " tokens");
    const int64_t off = std::max<int64_t>(acc_p[b] - 1, 0);
    TORCH_CHECK(off + W - 1 <= L && W - 2 + len_p[b] <= L && W - 1 + len_p[b] <= kMaxState, op,
                ": row ", b, " (num_accepted ", acc_p[b], ", ", len_p[b],
                " tokens) does not fit the conv buffer's ", L, " columns");
  }
  auto xf = f32(x), wf = f32(weight), bf = bias ? f32(*bias) : torch::Tensor();
  const float *x_p = xf.data_ptr<float>(), *w_p = wf.data_ptr<float>(),
              *b_p = bias ? bf.data_ptr<float>() : nullptr;
  auto y = torch::zeros({tokens, dim}, xf.options());
  float* y_p = y.data_ptr<float>();
  float* s_p = conv_state.data_ptr<float>();
  const int64_t s_blk = conv_state.stride(0), s_c = conv_state.stride(1), s_j = conv_state.stride(2);

  // ~W * tokens multiply-adds per channel: split over channels only for large batches.
  at::parallel_for(0, rows * dim, 2048, [&](int64_t begin, int64_t end) {
    float seq[kMaxState];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dim, c = task % dim, t0 = st_p[b], len = len_p[b];
      if (blk_p[b] == 0) continue;
      float* col = s_p + blk_p[b] * s_blk + c * s_c;
      const int64_t off = std::max<int64_t>(acc_p[b] - 1, 0);
      for (int64_t j = 0; j < W - 1; ++j) seq[j] = col[(off + j) * s_j];
      for (int64_t t = 0; t < len; ++t) seq[W - 1 + t] = x_p[(t0 + t) * dim + c];
      const float* wc = w_p + c * W;
      for (int64_t t = 0; t < len; ++t) {
        float acc = b_p ? b_p[c] : 0.f;
        for (int64_t k = 0; k < W; ++k) acc += wc[k] * seq[t + k];
        y_p[(t0 + t) * dim + c] = silu ? acc / (1.f + std::exp(-acc)) : acc;
      }
      for (int64_t j = 0; j < W - 2 + len; ++j) col[j * s_j] = seq[j + 1];
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-step SSM verification kernels for the CPU (see ops/verify.py)";
  m.def("mamba2_verify", &mamba2_verify, "Mamba2 verify step (state updated in place)");
  m.def("mamba1_verify", &mamba1_verify, "Mamba1 verify step (state updated in place)");
  m.def("ssm_spec_step", &ssm_spec_step,
        "vLLM's verify contract: every candidate's state stored to its block");
  m.def("conv_spec_step", &conv_spec_step,
        "vLLM's verify contract for the causal conv: outputs, window shifted past the tokens");
}
