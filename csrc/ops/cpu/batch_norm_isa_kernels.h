// Batch-norm CPU kernels, written once and compiled once per instruction set: batch_norm.cpp
// includes this file several times, each time inside its own namespace and under its own
// `#pragma GCC target`, then picks one build at run time. Hence no include guard and no
// #include here: everything it uses (batch_norm_layout.h, <cstring>, <utility>, <vector>,
// c10 types, <immintrin.h> on x86) is included before.
//
// The including file defines AVKERNELS_BUILD_AVX512 or AVKERNELS_BUILD_AVX2 around the x86
// builds (`#pragma GCC target` does not define __AVX512F__ etc. in C++), for the float16
// conversion intrinsics and the AVX2 build's help to the compiler (see half_of).
//
// Vectors are GCC/Clang vector extensions of a fixed 64 bytes (16 float32 or 8 float64 lanes);
// the compiler lowers them to one AVX-512, two AVX2 (with help: see half_of) or four SSE
// registers. Because the lane count and the order of every operation are fixed in the source,
// all builds give bitwise identical results. Build with -ffp-contract=off: x * scale + shift must
// round like PyTorch's separate multiply and add so the ReLU mask and the dead counts match the
// reference exactly.

#define AVK_INLINE inline __attribute__((always_inline))
#define AVK_INLINE_LAMBDA __attribute__((always_inline))

template <typename acc_t>
struct Lanes;
// Vec: the vector; Mask: what comparing two Vec gives; Count: its lane type; Bits: the lanes' bit
// patterns, unsigned; UnalignedVec: Vec at any element-aligned address, for loads and stores (it
// aliases only its element type, so accumulators stay in registers).
template <>
struct Lanes<float> {
  typedef float Vec __attribute__((vector_size(64)));
  typedef float UnalignedVec __attribute__((vector_size(64), aligned(4)));
  typedef int32_t Mask __attribute__((vector_size(64)));
  typedef uint32_t Bits __attribute__((vector_size(64)));
  typedef int32_t Count;
};
template <>
struct Lanes<double> {
  typedef double Vec __attribute__((vector_size(64)));
  typedef double UnalignedVec __attribute__((vector_size(64), aligned(8)));
  typedef int64_t Mask __attribute__((vector_size(64)));
  typedef uint64_t Bits __attribute__((vector_size(64)));
  typedef int64_t Count;
};
template <typename acc_t>
using Vec = typename Lanes<acc_t>::Vec;
template <typename acc_t>
using Count = typename Lanes<acc_t>::Count;
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);
static_assert(kPlaneLanes == 2 * kLanes<float>, "span kernels: two float32 accumulator vectors");

// --- stepping through a contiguous range ----------------------------------------------------
// for_each_step(n, body) calls body(i, step) over [0, n): whole vectors first (two per
// iteration, alternating accumulator slots 0 and 1 to hide addition latency), then scalars.

struct ScalarStep {
  static constexpr bool vector = false;
  static constexpr int slot = 0;
};
template <int k>
struct VectorStep {
  static constexpr bool vector = true;
  static constexpr int slot = k;
};

template <typename Step, typename acc_t>
using Value = std::conditional_t<Step::vector, Vec<acc_t>, acc_t>;

template <typename acc_t, typename Body>
AVK_INLINE void for_each_step(int64_t n, Body&& body) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    body(i, VectorStep<0>{});
    body(i + L, VectorStep<1>{});
  }
  if (i + L <= n) {
    body(i, VectorStep<0>{});
    i += L;
  }
  for (; i < n; ++i) body(i, ScalarStep{});
}

template <typename Step, typename T>
AVK_INLINE Value<Step, T> load(Step, const T* p) {
  if constexpr (Step::vector) {
    return *reinterpret_cast<const typename Lanes<T>::UnalignedVec*>(p);
  } else {
    return *p;
  }
}

#if defined(AVKERNELS_BUILD_AVX2)
// On AVX2, GCC 12 keeps a 64-byte vector in two registers while it meets only arithmetic, loads
// and the extraction of its halves; comparing two such vectors it does lane by lane, and a 64-byte
// vector that is stored and used again, or built from halves, it takes through memory. So the
// AVX2 build stores and compares by halves, and builds masks with integer arithmetic.

// Lanes [H * half, (H + 1) * half) of v as a 256-bit vector (I indexes a half).
template <int H, typename V, std::size_t... I>
AVK_INLINE auto half_of(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I + H * sizeof...(I))...);
}
#endif

template <typename Step, typename T>
AVK_INLINE void store(Step, T* p, Value<Step, T> v) {
  if constexpr (Step::vector) {
#if defined(AVKERNELS_BUILD_AVX2)
    typedef T UnalignedHalf __attribute__((vector_size(32), aligned(sizeof(T))));
    constexpr auto half = std::make_index_sequence<kLanes<T> / 2>{};
    reinterpret_cast<UnalignedHalf*>(p)[0] = half_of<0>(v, half);
    reinterpret_cast<UnalignedHalf*>(p)[1] = half_of<1>(v, half);
#else
    *reinterpret_cast<typename Lanes<T>::UnalignedVec*>(p) = v;
#endif
  } else {
    *p = v;
  }
}

// A store of whole output vectors that bypasses the caches (non-temporal), for outputs too large
// to stay cached: it skips reading each line before writing it and leaves the input cached. p is
// 64-byte aligned. The baseline build stores normally. Callers end their writes with
// end_streaming_stores().
template <bool STREAM, typename Step, typename T>
AVK_INLINE void store_output_vector(Step step, T* p, Value<Step, T> v) {
  if constexpr (STREAM && Step::vector) {
#if defined(AVKERNELS_BUILD_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(p, v);
    } else {
      _mm512_stream_pd(p, v);
    }
    return;
#elif defined(AVKERNELS_BUILD_AVX2)
    constexpr auto half = std::make_index_sequence<kLanes<T> / 2>{};
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(p, half_of<0>(v, half));
      _mm256_stream_ps(p + kLanes<T> / 2, half_of<1>(v, half));
    } else {
      _mm256_stream_pd(p, half_of<0>(v, half));
      _mm256_stream_pd(p + kLanes<T> / 2, half_of<1>(v, half));
    }
    return;
#endif
  }
  store(step, p, v);
}

// Orders this thread's non-temporal stores before its later stores (the join of the parallel
// region), so other threads see the output.
AVK_INLINE void end_streaming_stores() {
#if defined(AVKERNELS_BUILD_AVX512) || defined(AVKERNELS_BUILD_AVX2)
  _mm_sfence();
#endif
}

#if defined(AVKERNELS_BUILD_AVX2)
template <typename V>
using BitsVec = typename Lanes<std::decay_t<decltype(std::declval<V>()[0])>>::Bits;

// All ones in the lanes of z that are > 0 (NEGATIVE: < 0), else 0; NaN and +-0 are neither.
// Such a lane's bits minus those of the least positive (negative) value are below the bits of
// +infinity, unsigned; that comparison is read from sign bits, as infinity's is clear.
template <bool NEGATIVE, typename V>
AVK_INLINE BitsVec<V> sign_mask(V z) {
  using U = std::decay_t<decltype(BitsVec<V>{}[0])>;
  constexpr int kWidth = 8 * sizeof(U);
  constexpr U kSign = U(1) << (kWidth - 1);
  constexpr U kInfinity = sizeof(U) == 4 ? U(0x7F800000) : U(0x7FF0000000000000);
  const BitsVec<V> offset = (BitsVec<V>)z - (NEGATIVE ? kSign + 1 : U(1));
  return U(0) - (((offset - kInfinity) & ~offset) >> (kWidth - 1));
}
#endif

// Works for scalars and vectors alike; NaN stays NaN, as with torch.clamp_min.
template <typename T>
AVK_INLINE T relu(T z) {
#if defined(AVKERNELS_BUILD_AVX2)
  if constexpr (!std::is_arithmetic_v<T>) {
    return (T)((BitsVec<T>)z & ~sign_mask<true>(z));
  } else
#endif
  {
    return z < T{} ? T{} : z;
  }
}

// dy where the pre-activation z is positive, else 0 (the fused ReLU's backward). The scalar
// form masks bits: compilers turn the plain ternary into an unpredictable branch.
template <typename T>
AVK_INLINE T mask_by_relu(T z, T dy) {
  if constexpr (std::is_floating_point_v<T>) {
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits bits;
    std::memcpy(&bits, &dy, sizeof bits);
    bits &= Bits(0) - static_cast<Bits>(z > T{});
    std::memcpy(&dy, &bits, sizeof bits);
    return dy;
  } else {
#if defined(AVKERNELS_BUILD_AVX2)
    return (T)((BitsVec<T>)dy & sign_mask<false>(z));
#else
    return z > T{} ? dy : T{};
#endif
  }
}

// Sum of a vector's lanes by halving (lanes [0, n/2) + [n/2, n), and again): a fixed order
// that takes log2(lanes) vector additions rather than a chain of scalar ones. I indexes the
// lower half of v.
template <typename T, typename V, std::size_t... I>
AVK_INLINE T fold_lanes(V v, std::index_sequence<I...>) {
  constexpr std::size_t half = sizeof...(I);
  if constexpr (half == 0) {
    return v[0];
  } else {
    typedef T Half __attribute__((vector_size(sizeof(T) * half)));
    const Half sum = Half{v[I]...} + Half{v[I + half]...};
    return fold_lanes<T>(sum, std::make_index_sequence<half / 2>{});
  }
}

template <typename T, typename V>
AVK_INLINE T horizontal_sum(V v) {
  return fold_lanes<T>(v, std::make_index_sequence<sizeof(V) / sizeof(T) / 2>{});
}

// A running sum over for_each_step: two vector accumulators and a scalar one, combined in a
// fixed order.
template <typename acc_t>
struct Sum {
  Vec<acc_t> lanes[2] = {};
  acc_t tail = 0;

  template <typename Step>
  AVK_INLINE void add(Step, Value<Step, acc_t> v) {
    if constexpr (Step::vector) {
      lanes[Step::slot] += v;
    } else {
      tail += v;
    }
  }
  AVK_INLINE acc_t total() const { return horizontal_sum<acc_t>(lanes[0] + lanes[1]) + tail; }
};

// Counting values <= 0 (NaN is not counted, as `z <= 0` in PyTorch); a true vector comparison
// is -1 in every lane.

// A bit per lane of z, set where z <= 0 (ordered: NaN gives 0), on the x86 builds that have a
// cheap mask extraction. Adding population counts to a scalar takes fewer instructions than
// widening comparison results into lane counters, and needs no horizontal sum per span (measured:
// the count's cost in a 28x28-plane eval forward fell from ~20% of the op to ~0).
#if defined(AVKERNELS_BUILD_AVX512) || defined(AVKERNELS_BUILD_AVX2)
#define AVKERNELS_COUNT_BY_BITS 1
#if defined(AVKERNELS_BUILD_AVX2)
// Bits of the lanes <= 0, compared by 256-bit halves (see half_of).
template <typename acc_t>
AVK_INLINE uint32_t non_positive_half_bits(Vec<acc_t> z) {
  constexpr auto half = std::make_index_sequence<kLanes<acc_t> / 2>{};
  if constexpr (std::is_same_v<acc_t, float>) {
    const auto bits = [](__m256 v) {
      return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LE_OQ)));
    };
    return bits(half_of<0>(z, half)) | (bits(half_of<1>(z, half)) << kLanes<acc_t> / 2);
  } else {
    const auto bits = [](__m256d v) {
      return uint32_t(_mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_LE_OQ)));
    };
    return bits(half_of<0>(z, half)) | (bits(half_of<1>(z, half)) << kLanes<acc_t> / 2);
  }
}
#endif

template <typename acc_t>
AVK_INLINE uint32_t non_positive_bits(Vec<acc_t> z) {
#if defined(AVKERNELS_BUILD_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    return _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LE_OQ);
  } else {
    return _mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_LE_OQ);
  }
#else
  return non_positive_half_bits<acc_t>(z);
#endif
}
#endif

// A count over for_each_step, in registers.
template <typename acc_t>
struct NonPositiveCount {
#ifdef AVKERNELS_COUNT_BY_BITS
  uint64_t pending = 0;  // bits of a slot-0 vector not yet counted
#else
  typename Lanes<acc_t>::Mask lanes = {};
#endif
  int64_t tail = 0;

  template <typename Step>
  AVK_INLINE void add(Step, Value<Step, acc_t> z) {
    if constexpr (Step::vector) {
#ifdef AVKERNELS_COUNT_BY_BITS
      // for_each_step visits slot 0 then slot 1: one population count serves both vectors.
      if constexpr (Step::slot == 0) {
        tail += __builtin_popcount(pending);
        pending = non_positive_bits<acc_t>(z);
      } else {
        tail += __builtin_popcountll(pending | uint64_t(non_positive_bits<acc_t>(z)) << kLanes<acc_t>);
        pending = 0;
      }
#else
      lanes -= (z <= Vec<acc_t>{});
#endif
    } else {
      tail += z <= 0;
    }
  }
  // Counts only the lanes [first, kLanes) of z.
  AVK_INLINE void add_lanes_from(int64_t first, Vec<acc_t> z) {
#ifdef AVKERNELS_COUNT_BY_BITS
    tail += __builtin_popcount(non_positive_bits<acc_t>(z) >> first);
#else
    typename Lanes<acc_t>::Mask lane;
    for (int64_t i = 0; i < kLanes<acc_t>; ++i) lane[i] = i;
    lanes -= (z <= Vec<acc_t>{}) & (lane >= static_cast<Count<acc_t>>(first));
#endif
  }
  AVK_INLINE int64_t total() const {
#ifdef AVKERNELS_COUNT_BY_BITS
    return tail + __builtin_popcountll(pending);
#else
    return tail + horizontal_sum<Count<acc_t>>(lanes);
#endif
  }
};

// Per-channel counters in memory (rows layout), 16-bit because a run has at most kLaneValues
// rows: narrower counters halve the memory operations the count adds to the normalise loop.
// (Adding a true comparison's -1 is adding 1 modulo 2^16.)
using RowCount = uint16_t;
static_assert(kLaneValues <= 65535, "a run's per-channel count must fit RowCount");

#if defined(AVKERNELS_BUILD_AVX2)
// All ones in lane i where bit i of bits is set, else 0.
template <typename Counts, std::size_t... I>
AVK_INLINE Counts lane_flags(uint32_t bits, std::index_sequence<I...>) {
  const Counts lane_bit = {RowCount(1u << I)...};
  return (Counts)(((Counts{} + RowCount(bits)) & lane_bit) == lane_bit);
}
#endif

template <typename Step, typename acc_t>
AVK_INLINE void count_non_positive(Step, RowCount* counts, Value<Step, acc_t> z) {
  if constexpr (Step::vector) {
    typedef RowCount Counts __attribute__((vector_size(kLanes<acc_t> * sizeof(RowCount))));
    typedef RowCount UnalignedCounts
        __attribute__((vector_size(kLanes<acc_t> * sizeof(RowCount)), aligned(sizeof(RowCount))));
#if defined(AVKERNELS_BUILD_AVX2)
    // From the comparison's bits: comparing 64-byte vectors is slow there (see half_of).
    *reinterpret_cast<UnalignedCounts*>(counts) -= lane_flags<Counts>(
        non_positive_bits<acc_t>(z), std::make_index_sequence<kLanes<acc_t>>{});
#else
    *reinterpret_cast<UnalignedCounts*>(counts) -=
        __builtin_convertvector(z <= Vec<acc_t>{}, Counts);
#endif
  } else {
    *counts += z <= 0;
  }
}

// --- dtype conversion -------------------------------------------------------------------------
// Kernels compute on contiguous accumulation-type arrays. float32/float64 input is used in place;
// bfloat16/float16 runs are converted through a per-thread buffer, kLanes<float> values at a
// time by Convert (bit for bit what the c10 scalar conversions, used for the tails, give).

template <typename scalar_t>
struct Convert;

template <>
struct Convert<c10::BFloat16> {
  typedef uint16_t Bits __attribute__((vector_size(kLanes<float> * 2), aligned(2), may_alias));
  typedef uint32_t Wide __attribute__((vector_size(kLanes<float> * 4)));

  static AVK_INLINE void to_float(const c10::BFloat16* src, float* dst) {
    const Wide bits = __builtin_convertvector(*reinterpret_cast<const Bits*>(src), Wide) << 16;
    store(VectorStep<0>{}, dst, reinterpret_cast<const Vec<float>&>(bits));
  }
  // Round to nearest even; NaN becomes 0x7FC0 (c10::BFloat16's rule).
  static AVK_INLINE void from_float(const float* src, c10::BFloat16* dst) {
    const Vec<float> v = load(VectorStep<0>{}, src);
    const Wide bits = reinterpret_cast<const Wide&>(v);
    const Wide rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16;
    const Wide result = v != v ? Wide{} + 0x7FC0 : rounded;
    *reinterpret_cast<Bits*>(dst) = __builtin_convertvector(result, Bits);
  }
};

template <>
struct Convert<c10::Half> {
  static AVK_INLINE void to_float(const c10::Half* src, float* dst) {
#if defined(AVKERNELS_BUILD_AVX512)
    const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    _mm512_storeu_ps(dst, _mm512_cvtph_ps(halves));
#elif defined(AVKERNELS_BUILD_AVX2)
    for (int half = 0; half < 2; ++half) {
      _mm256_storeu_ps(dst + 8 * half, _mm256_cvtph_ps(_mm_loadu_si128(
                                           reinterpret_cast<const __m128i*>(src + 8 * half))));
    }
#else
    for (int64_t i = 0; i < kLanes<float>; ++i) dst[i] = static_cast<float>(src[i]);
#endif
  }
  static AVK_INLINE void from_float(const float* src, c10::Half* dst) {
#if defined(AVKERNELS_BUILD_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT));
#elif defined(AVKERNELS_BUILD_AVX2)
    for (int half = 0; half < 2; ++half) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 8 * half),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + 8 * half), _MM_FROUND_TO_NEAREST_INT));
    }
#else
    for (int64_t i = 0; i < kLanes<float>; ++i) dst[i] = static_cast<c10::Half>(src[i]);
#endif
  }
};

template <typename scalar_t, typename acc_t>
AVK_INLINE const acc_t* as_acc(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    int64_t i = 0;
    for (; i + kLanes<float> <= n; i += kLanes<float>) {
      Convert<scalar_t>::to_float(src + i, buffer + i);
    }
    for (; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
    return buffer;
  }
}

// Where a kernel writes its output: dst itself, or the buffer that store_output converts.
template <typename scalar_t, typename acc_t>
AVK_INLINE acc_t* output_span(scalar_t* dst, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return dst;
  } else {
    return buffer;
  }
}

template <typename scalar_t, typename acc_t>
AVK_INLINE void store_output(scalar_t* dst, const acc_t* values, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    int64_t i = 0;
    for (; i + kLanes<float> <= n; i += kLanes<float>) {
      Convert<scalar_t>::from_float(values + i, dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(values[i]);
  }
}

// --- span kernels: one contiguous run of a single channel (NCHW planes) ----------------------

// A span's scalar operand of vector arithmetic: operand(step) is the scalar, or on AVX2 for a
// vector step a vector of it. Other builds let the compiler broadcast the scalar; on AVX2, GCC 12
// writes a 64-byte broadcast that is used more than once to memory lane by lane, for every span
// (most of a 7x7 plane's cost), but keeps this one, made of two 256-bit broadcasts, in registers.
template <typename acc_t>
struct Splat {
  acc_t value;
#if defined(AVKERNELS_BUILD_AVX2)
  Vec<acc_t> lanes;

  explicit Splat(acc_t v) : value(v) {
    typedef acc_t Half __attribute__((vector_size(32)));
    Half half;
    if constexpr (std::is_same_v<acc_t, float>) {
      half = _mm256_set1_ps(v);
    } else {
      half = _mm256_set1_pd(v);
    }
    std::memcpy(&lanes, &half, sizeof half);
    std::memcpy(reinterpret_cast<char*>(&lanes) + sizeof half, &half, sizeof half);
  }
#else
  explicit Splat(acc_t v) : value(v) {}
#endif

  template <typename Step>
  AVK_INLINE auto operator()(Step) const {
#if defined(AVKERNELS_BUILD_AVX2)
    if constexpr (Step::vector) {
      return lanes;
    } else
#endif
    {
      return value;
    }
  }
};

template <typename acc_t>
acc_t span_sum(const acc_t* x, int64_t n) {
  Sum<acc_t> sum;
  for_each_step<acc_t>(n, [&](int64_t i, auto step) { sum.add(step, load(step, x + i)); });
  return sum.total();
}

// Adds sum((x - center)^2) to m2 and sum(x - center) to residual.
template <typename acc_t>
void span_deviations(const acc_t* x, int64_t n, acc_t center, acc_t& m2, acc_t& residual) {
  Sum<acc_t> squares, deviations;
  const Splat<acc_t> mid(center);
  for_each_step<acc_t>(n, [&](int64_t i, auto step) {
    const auto d = load(step, x + i) - mid(step);
    squares.add(step, d * d);
    deviations.add(step, d);
  });
  m2 += squares.total();
  residual += deviations.total();
}

// y = act(x * scale + shift); returns the count of x * scale + shift <= 0 (0 unless COUNT).
// A span of at least one vector ends with a vector aligned to its end rather than a scalar tail
// (which cost as much as the vectors of a 7x7 plane): it overlaps the vector before, whose outputs
// it computes and stores again (the same values) and whose lanes it leaves out of the count.
// STREAM: whole vectors are stored non-temporally (y 64-byte aligned); that end vector is not.
template <bool RELU, bool COUNT, bool STREAM, typename acc_t>
AVK_INLINE int64_t span_normalise(const acc_t* x, acc_t* y, int64_t n, acc_t scale,
                                  acc_t shift) {
  constexpr int64_t L = kLanes<acc_t>;
  NonPositiveCount<acc_t> count;
  const Splat<acc_t> s(scale), t(shift);
  // (Lambdas forced inline: GCC kept the counting one out of line, its state in memory.)
  const auto normalise_at = [&](int64_t i, auto step) AVK_INLINE_LAMBDA {
    const auto z = load(step, x + i) * s(step) + t(step);
    store_output_vector<STREAM>(step, y + i, RELU ? relu(z) : z);
    return z;
  };
  if (n < L) {
    for (int64_t i = 0; i < n; ++i) {
      const acc_t z = normalise_at(i, ScalarStep{});
      if constexpr (COUNT) count.add(ScalarStep{}, z);
    }
    return count.total();
  }
  const int64_t whole = n - n % L;
  for_each_step<acc_t>(whole, [&](int64_t i, auto step) AVK_INLINE_LAMBDA {
    const auto z = normalise_at(i, step);
    if constexpr (COUNT) count.add(step, z);
  });
  if (whole < n) {
    const Vec<acc_t> z = load(VectorStep<0>{}, x + n - L) * s(VectorStep<0>{}) + t(VectorStep<0>{});
    store(VectorStep<0>{}, y + n - L, RELU ? relu(z) : z);
    if constexpr (COUNT) count.add_lanes_from(L - (n - whole), z);
  }
  return count.total();
}

// Adds sum(dy') to sum_dy and sum(dy' * (x - mean)) to sum_dy_xc.
template <bool RELU, typename acc_t>
void span_grad_sums(const acc_t* x, const acc_t* dy, int64_t n, acc_t scale, acc_t shift,
                    acc_t mean, acc_t& sum_dy, acc_t& sum_dy_xc) {
  Sum<acc_t> s1, s2;
  const Splat<acc_t> s(scale), t(shift), m(mean);
  for_each_step<acc_t>(n, [&](int64_t i, auto step) {
    const auto xv = load(step, x + i);
    auto g = load(step, dy + i);
    if constexpr (RELU) g = mask_by_relu(xv * s(step) + t(step), g);
    s1.add(step, g);
    s2.add(step, g * (xv - m(step)));
  });
  sum_dy += s1.total();
  sum_dy_xc += s2.total();
}

// grad_x of one span; without batch statistics also adds the grad sums (one pass in eval).
// STREAM: dx is stored non-temporally (64-byte aligned, n a whole number of vectors).
template <bool RELU, bool BATCH_STATS, bool STREAM, typename acc_t>
void span_grad_input(const acc_t* x, const acc_t* dy, acc_t* dx, int64_t n, acc_t scale,
                     acc_t shift, acc_t mean, acc_t coef_dy, acc_t coef_xc, acc_t coef_const,
                     acc_t& sum_dy, acc_t& sum_dy_xc) {
  Sum<acc_t> s1, s2;
  const Splat<acc_t> s(scale), t(shift), m(mean), k_dy(coef_dy), k_xc(coef_xc),
      k_const(coef_const);
  for_each_step<acc_t>(n, [&](int64_t i, auto step) {
    const auto xv = load(step, x + i);
    auto g = load(step, dy + i);
    if constexpr (RELU) g = mask_by_relu(xv * s(step) + t(step), g);
    if constexpr (BATCH_STATS) {
      store_output_vector<STREAM>(
          step, dx + i, g * k_dy(step) + (xv - m(step)) * k_xc(step) + k_const(step));
    } else {
      store_output_vector<STREAM>(step, dx + i, g * k_dy(step));
      s1.add(step, g);
      s2.add(step, g * (xv - m(step)));
    }
  });
  if constexpr (!BATCH_STATS) {
    sum_dy += s1.total();
    sum_dy_xc += s2.total();
  }
}

// --- row kernels: rows of C channels (channels_last); per-channel arrays of C values ----------
// The reductions walk the channels in blocks of up to kBlockVectors vectors and, per block, every
// row in order: the block's per-channel values (sums, coefficients) stay in registers for the
// whole run, so an element costs only its own loads. (Going row by row, those values were loaded
// and the sums stored again for every row: at C = 512 the backward was bound by those loads.)
// The elementwise kernels do the same when one block spans a whole row; wider rows they take row
// by row, as walking a block down rows that are also being written measured up to 1.4x slower at
// C = 128 (4 KiB load/store aliasing). Sums add the rows one by one in order either way, so
// results do not depend on the walk.
#if defined(AVKERNELS_BUILD_AVX512)
constexpr int kBlockVectors = 4;  // at most 6 per-channel arrays of 4 vectors: 24 of 32 registers
#else
constexpr int kBlockVectors = 1;  // AVX2 and SSE hold a 64-byte vector in 2 or 4 registers
#endif

#define AVK_UNROLL _Pragma("GCC unroll 4")

// Calls body(c, width, step, r_begin, r_end) for each block of channels and the rows
// [r_begin, r_end): `width` (a std::integral_constant) vectors from channel c, then the last
// C % lanes channels one by one with a ScalarStep.
template <typename acc_t, typename Body>
AVK_INLINE void for_each_channel_block(int64_t C, int64_t r_begin, int64_t r_end, Body&& body) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t c = 0;
  for (; c + kBlockVectors * L <= C; c += kBlockVectors * L) {
    body(c, std::integral_constant<int, kBlockVectors>{}, VectorStep<0>{}, r_begin, r_end);
  }
  for (; c + L <= C; c += L) {
    body(c, std::integral_constant<int, 1>{}, VectorStep<0>{}, r_begin, r_end);
  }
  for (; c < C; ++c) body(c, std::integral_constant<int, 1>{}, ScalarStep{}, r_begin, r_end);
}

// The elementwise kernels' walk: all rows per block where a block spans a row, else row by row.
template <typename acc_t, typename Body>
AVK_INLINE void for_each_elementwise_block(int64_t rows, int64_t C, Body&& body) {
  if (C <= kBlockVectors * kLanes<acc_t>) {
    for_each_channel_block<acc_t>(C, 0, rows, body);
  } else {
    for (int64_t r = 0; r < rows; ++r) for_each_channel_block<acc_t>(C, r, r + 1, body);
  }
}

// Values per step: a vector's lanes, or 1.
template <typename Step, typename acc_t>
constexpr int64_t kStepLanes = Step::vector ? kLanes<acc_t> : 1;

// The per-channel values of a block of W steps: v[w] covers the channels from c + w * lanes.
template <typename Step, typename acc_t, int W>
struct Block {
  static constexpr int64_t L = kStepLanes<Step, acc_t>;
  Value<Step, acc_t> v[W];

  AVK_INLINE void load_from(const acc_t* p) {
    AVK_UNROLL for (int w = 0; w < W; ++w) v[w] = load(Step{}, p + w * L);
  }
  AVK_INLINE void store_to(acc_t* p) const {
    AVK_UNROLL for (int w = 0; w < W; ++w) store(Step{}, p + w * L, v[w]);
  }
};

// Adds the column sums of x to sum.
template <typename acc_t>
void rows_sum(const acc_t* x, int64_t rows, int64_t C, acc_t* sum) {
  for_each_channel_block<acc_t>(C, 0, rows, [&](int64_t c, auto width, auto step, int64_t r_begin,
                                                int64_t r_end) AVK_INLINE_LAMBDA {
    using B = Block<decltype(step), acc_t, decltype(width)::value>;
    B acc;
    acc.load_from(sum + c);
    for (int64_t r = r_begin; r < r_end; ++r) {
      AVK_UNROLL for (int w = 0; w < decltype(width)::value; ++w) {
        acc.v[w] += load(step, x + r * C + c + w * B::L);
      }
    }
    acc.store_to(sum + c);
  });
}

// Adds sum((x - center)^2) to m2 and sum(x - center) to residual, per column.
template <typename acc_t>
void rows_deviations(const acc_t* x, int64_t rows, int64_t C, const acc_t* center, acc_t* m2,
                     acc_t* residual) {
  for_each_channel_block<acc_t>(C, 0, rows, [&](int64_t c, auto width, auto step, int64_t r_begin,
                                                int64_t r_end) AVK_INLINE_LAMBDA {
    using B = Block<decltype(step), acc_t, decltype(width)::value>;
    B mid, squares, deviations;
    mid.load_from(center + c);
    squares.load_from(m2 + c);
    deviations.load_from(residual + c);
    for (int64_t r = r_begin; r < r_end; ++r) {
      AVK_UNROLL for (int w = 0; w < decltype(width)::value; ++w) {
        const auto d = load(step, x + r * C + c + w * B::L) - mid.v[w];
        squares.v[w] += d * d;
        deviations.v[w] += d;
      }
    }
    squares.store_to(m2 + c);
    deviations.store_to(residual + c);
  });
}

// y = act(x * scale + shift); adds the per-column count of x * scale + shift <= 0 to counts.
// STREAM: as span_normalise (the rows are 64-byte aligned, C a whole number of vectors).
template <bool RELU, bool COUNT, bool STREAM, typename acc_t>
void rows_normalise(const acc_t* x, acc_t* y, int64_t rows, int64_t C, const acc_t* scale,
                    const acc_t* shift, RowCount* counts) {
  for_each_elementwise_block<acc_t>(rows, C, [&](int64_t c, auto width, auto step, int64_t r_begin,
                                                 int64_t r_end) AVK_INLINE_LAMBDA {
    constexpr int W = decltype(width)::value;
    using B = Block<decltype(step), acc_t, W>;
    B s, t;
    s.load_from(scale + c);
    t.load_from(shift + c);
    for (int64_t r = r_begin; r < r_end; ++r) {
      AVK_UNROLL for (int w = 0; w < W; ++w) {
        const int64_t i = r * C + c + w * B::L;
        const auto z = load(step, x + i) * s.v[w] + t.v[w];
        if constexpr (COUNT) {
          count_non_positive<decltype(step), acc_t>(step, counts + c + w * B::L, z);
        }
        store_output_vector<STREAM>(step, y + i, RELU ? relu(z) : z);
      }
    }
  });
}

// One pass over (x, dy) rows, per column: with SUMS_ONLY, adds sum(dy') to sum_dy and
// sum(dy' * (x - mean)) to sum_dy_xc; else writes grad_x (as span_grad_input; STREAM: the rows
// are 64-byte aligned, C a whole number of vectors) and, without batch statistics, adds the same
// sums.
template <bool RELU, bool SUMS_ONLY, bool BATCH_STATS, bool STREAM, typename acc_t>
void rows_grad(const acc_t* x, const acc_t* dy, acc_t* dx, int64_t rows, int64_t C,
               const GradCoefficients<acc_t>& k, acc_t* sum_dy, acc_t* sum_dy_xc) {
  constexpr bool kSums = SUMS_ONLY || !BATCH_STATS;
  const auto block = [&](int64_t c, auto width, auto step, int64_t r_begin,
                         int64_t r_end) AVK_INLINE_LAMBDA {
    using B = Block<decltype(step), acc_t, decltype(width)::value>;
    B s, t, mean, coef_dy, coef_xc, coef_const, s1, s2;
    if constexpr (RELU) {
      s.load_from(k.scale + c);
      t.load_from(k.shift + c);
    }
    mean.load_from(k.mean + c);
    if constexpr (!SUMS_ONLY) coef_dy.load_from(k.coef_dy + c);
    if constexpr (!SUMS_ONLY && BATCH_STATS) {
      coef_xc.load_from(k.coef_xc + c);
      coef_const.load_from(k.coef_const + c);
    }
    if constexpr (kSums) {
      s1.load_from(sum_dy + c);
      s2.load_from(sum_dy_xc + c);
    }
    for (int64_t r = r_begin; r < r_end; ++r) {
      AVK_UNROLL for (int w = 0; w < decltype(width)::value; ++w) {
        const int64_t i = r * C + c + w * B::L;
        const auto xv = load(step, x + i);
        auto g = load(step, dy + i);
        if constexpr (RELU) g = mask_by_relu(xv * s.v[w] + t.v[w], g);
        const auto xc = xv - mean.v[w];
        if constexpr (!SUMS_ONLY && BATCH_STATS) {
          store_output_vector<STREAM>(step, dx + i,
                                      g * coef_dy.v[w] + xc * coef_xc.v[w] + coef_const.v[w]);
        } else if constexpr (!SUMS_ONLY) {
          store_output_vector<STREAM>(step, dx + i, g * coef_dy.v[w]);
        }
        if constexpr (kSums) {
          s1.v[w] += g;
          s2.v[w] += g * xc;
        }
      }
    }
    if constexpr (kSums) {
      s1.store_to(sum_dy + c);
      s2.store_to(sum_dy_xc + c);
    }
  };
  if constexpr (SUMS_ONLY) {
    for_each_channel_block<acc_t>(C, 0, rows, block);
  } else {
    for_each_elementwise_block<acc_t>(rows, C, block);
  }
}

#undef AVK_UNROLL

// --- run drivers ----------------------------------------------------------------------------

// Run-time flags to template flags: f(std::bool_constant<a>) / f(std::bool_constant<a>,
// std::bool_constant<b>).
template <typename F>
AVK_INLINE void with_flag(bool a, F&& f) {
  if (a) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename F>
AVK_INLINE void with_flags(bool a, bool b, F&& f) {
  with_flag(a, [&](auto a_flag) { with_flag(b, [&](auto b_flag) { f(a_flag, b_flag); }); });
}

// Calls fn(r, run) for the runs [begin, end), in memory order.
template <typename F>
AVK_INLINE void for_each_run(const Geometry& g, int64_t begin, int64_t end, F&& fn) {
  Run k = g.run(begin);
  for (int64_t r = begin; r < end; ++r, g.next(k)) fn(r, k);
}

template <typename scalar_t>
struct Kernels {
  using acc_t = acc_type_t<scalar_t>;
  static constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  // bfloat16/float16 runs are converted in chunks of at most this many elements, so that the
  // conversion buffers stay in L1; float32/float64 runs are one chunk.
  static constexpr int64_t kChunkElements = kConvert ? 2048 : kRunElements;

  // Per-thread scratch: the conversion buffers (x, dy, output) and per-channel arrays.
  struct Scratch {
    std::vector<acc_t> x, dy, out;
    std::vector<acc_t> channel[3];

    Scratch(const Geometry& g, int64_t channel_arrays) {
      if (kConvert) {
        for (auto* buffer : {&x, &dy, &out}) buffer->resize(kChunkElements);
      }
      for (int64_t i = 0; i < channel_arrays; ++i) channel[i].resize(g.channels);
    }
    void clear_channel_arrays() {
      for (auto& v : channel) std::fill(v.begin(), v.end(), acc_t(0));
    }
  };

  // Calls fn(offset, positions) for consecutive position ranges of run k (at most
  // kChunkElements elements each): offset is the range's first element.
  template <typename F>
  static AVK_INLINE void for_each_chunk(const Geometry& g, const Run& k, F&& fn) {
    const int64_t per_position = g.channels_per_run();
    // (A plane's positions are single elements: no division per run.)
    const int64_t step =
        g.rows ? std::max<int64_t>(1, kChunkElements / per_position) : kChunkElements;
    for (int64_t p = 0; p < k.positions(); p += step) {
      fn(g.offset(k) + p * per_position, std::min(step, k.positions() - p));
    }
  }

  // Statistics from two passes over a run while it is in cache: the sum gives a first mean
  // (center), then the squared deviations about it, corrected by the residual sum(x - center).
  static void batch_stats(const Geometry& g, const scalar_t* x, int64_t begin, int64_t end,
                          double* run_mean, double* run_m2) {
    Scratch scratch(g, g.rows ? 3 : 0);
    const int64_t C = g.channels_per_run();
    for_each_run(g, begin, end, [&](int64_t r, const Run& k) {
      const int64_t len = k.positions();
      const double inv_count = 1.0 / static_cast<double>(len);
      const auto chunk = [&](int64_t offset, int64_t positions) {
        return as_acc(x + offset, positions * C, scratch.x.data());
      };
      if (g.rows) {
        scratch.clear_channel_arrays();
        acc_t* center = scratch.channel[0].data();
        acc_t* m2 = scratch.channel[1].data();
        acc_t* residual = scratch.channel[2].data();
        for_each_chunk(g, k, [&](int64_t offset, int64_t positions) {
          rows_sum(chunk(offset, positions), positions, C, center);
        });
        for (int64_t c = 0; c < C; ++c) center[c] /= static_cast<acc_t>(len);
        for_each_chunk(g, k, [&](int64_t offset, int64_t positions) {
          rows_deviations(chunk(offset, positions), positions, C, center, m2, residual);
        });
        for (int64_t c = 0; c < C; ++c) {
          const double res = residual[c];
          run_mean[g.value_index(r, c)] = center[c] + res * inv_count;
          run_m2[g.value_index(r, c)] = m2[c] - res * res * inv_count;
        }
      } else {
        acc_t sum = 0, m2 = 0, residual = 0;
        for_each_chunk(g, k, [&](int64_t offset, int64_t positions) {
          sum += span_sum(chunk(offset, positions), positions);
        });
        const acc_t center = sum / static_cast<acc_t>(len);
        for_each_chunk(g, k, [&](int64_t offset, int64_t positions) {
          span_deviations(chunk(offset, positions), positions, center, m2, residual);
        });
        const double res = residual;
        run_mean[r] = center + res * inv_count;
        run_m2[r] = m2 - res * res * inv_count;
      }
    });
  }

  template <bool RELU, bool COUNT, bool STREAM>
  static void normalise_runs(const Geometry& g, const scalar_t* x, scalar_t* y,
                             const acc_t* scale, const acc_t* shift, RunCount* counts,
                             int64_t begin, int64_t end) {
    Scratch scratch(g, 0);
    if (!g.rows && g.parts == 1 && g.spatial <= kChunkElements) {
      // Whole planes of one chunk each (small H*W): run r is plane r, so a plain loop does;
      // the general run bookkeeping cost as much as normalising a 7x7 plane.
      const int64_t HW = g.spatial;
      int64_t c = begin % g.channels;
      for (int64_t r = begin; r < end; ++r) {
        const acc_t* xa = as_acc(x + r * HW, HW, scratch.x.data());
        acc_t* ya = output_span(y + r * HW, scratch.out.data());
        const int64_t dead = span_normalise<RELU, COUNT, STREAM>(xa, ya, HW, scale[c], shift[c]);
        store_output(y + r * HW, ya, HW);
        if constexpr (COUNT) counts[r] = static_cast<RunCount>(dead);
        if (++c == g.channels) c = 0;
      }
      if constexpr (STREAM) end_streaming_stores();
      return;
    }
    std::vector<RowCount> channel_counts(g.rows && COUNT ? g.channels : 0);
    const int64_t C = g.channels_per_run();
    for_each_run(g, begin, end, [&](int64_t r, const Run& k) {
      std::fill(channel_counts.begin(), channel_counts.end(), RowCount(0));
      int64_t dead = 0;
      for_each_chunk(g, k, [&](int64_t offset, int64_t positions) {
        const int64_t size = positions * C;
        const acc_t* xa = as_acc(x + offset, size, scratch.x.data());
        acc_t* ya = output_span(y + offset, scratch.out.data());
        if (g.rows) {
          rows_normalise<RELU, COUNT, STREAM>(xa, ya, positions, C, scale, shift,
                                              channel_counts.data());
        } else {
          dead += span_normalise<RELU, COUNT, STREAM>(xa, ya, size, scale[k.channel],
                                                      shift[k.channel]);
        }
        store_output(y + offset, ya, size);
      });
      if constexpr (COUNT) {
        if (g.rows) {
          for (int64_t c = 0; c < C; ++c) counts[g.value_index(r, c)] = channel_counts[c];
        } else {
          counts[r] = static_cast<RunCount>(dead);
        }
      }
    });
    if constexpr (STREAM) end_streaming_stores();
  }

  static void normalise(const Geometry& g, const scalar_t* x, scalar_t* y, const acc_t* scale,
                        const acc_t* shift, bool relu, RunCount* counts, bool stream,
                        int64_t begin, int64_t end) {
    with_flags(relu, counts != nullptr, [&](auto relu_flag, auto count_flag) {
      constexpr bool kRelu = decltype(relu_flag)::value, kCount = decltype(count_flag)::value;
      // bfloat16/float16 outputs are written by store_output, never streamed.
      if (stream && !kConvert) {
        normalise_runs<kRelu, kCount, !kConvert>(g, x, y, scale, shift, counts, begin, end);
      } else {
        normalise_runs<kRelu, kCount, false>(g, x, y, scale, shift, counts, begin, end);
      }
    });
  }

  // One pass over (x, dy) per run: the grad sums only (SUMS_ONLY), or grad_x (with, when
  // normalising with running statistics, the grad sums of the same pass).
  template <bool RELU, bool SUMS_ONLY, bool BATCH_STATS, bool STREAM>
  static void grad_runs(const Geometry& g, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                        const GradCoefficients<acc_t>& k, int64_t begin, int64_t end,
                        double* run_sum_dy, double* run_sum_dy_xc) {
    constexpr bool kSums = SUMS_ONLY || !BATCH_STATS;
    Scratch scratch(g, g.rows && kSums ? 2 : 0);
    const int64_t C = g.channels_per_run();
    for_each_run(g, begin, end, [&](int64_t r, const Run& run) {
      scratch.clear_channel_arrays();
      acc_t* s1 = g.rows ? scratch.channel[0].data() : nullptr;  // per channel (rows)
      acc_t* s2 = g.rows ? scratch.channel[1].data() : nullptr;
      acc_t sum_dy = 0, sum_dy_xc = 0;  // the run's channel (planes)
      for_each_chunk(g, run, [&](int64_t offset, int64_t positions) {
        const int64_t size = positions * C;
        const acc_t* xa = as_acc(x + offset, size, scratch.x.data());
        const acc_t* dya = as_acc(dy + offset, size, scratch.dy.data());
        acc_t* dxa = SUMS_ONLY ? nullptr : output_span(dx + offset, scratch.out.data());
        if (g.rows) {
          rows_grad<RELU, SUMS_ONLY, BATCH_STATS, STREAM>(xa, dya, dxa, positions, C, k, s1, s2);
        } else {
          const int64_t c = run.channel;
          if constexpr (SUMS_ONLY) {
            span_grad_sums<RELU>(xa, dya, size, k.scale[c], k.shift[c], k.mean[c], sum_dy,
                                 sum_dy_xc);
          } else {
            const acc_t coef_xc = BATCH_STATS ? k.coef_xc[c] : acc_t(0);
            const acc_t coef_const = BATCH_STATS ? k.coef_const[c] : acc_t(0);
            span_grad_input<RELU, BATCH_STATS, STREAM>(xa, dya, dxa, size, k.scale[c], k.shift[c],
                                               k.mean[c], k.coef_dy[c], coef_xc, coef_const,
                                               sum_dy, sum_dy_xc);
          }
        }
        if constexpr (!SUMS_ONLY) store_output(dx + offset, dxa, size);
      });
      if constexpr (kSums) {
        if (g.rows) {
          for (int64_t c = 0; c < C; ++c) {
            run_sum_dy[g.value_index(r, c)] = s1[c];
            run_sum_dy_xc[g.value_index(r, c)] = s2[c];
          }
        } else {
          run_sum_dy[r] = sum_dy;
          run_sum_dy_xc[r] = sum_dy_xc;
        }
      }
    });
    if constexpr (STREAM) end_streaming_stores();
  }

  static void grad_sums(const Geometry& g, const scalar_t* dy, const scalar_t* x,
                        const GradCoefficients<acc_t>& k, bool relu, int64_t begin, int64_t end,
                        double* run_sum_dy, double* run_sum_dy_xc) {
    with_flag(relu, [&](auto relu_flag) {
      grad_runs<decltype(relu_flag)::value, true, true, false>(g, dy, x, nullptr, k, begin, end,
                                                               run_sum_dy, run_sum_dy_xc);
    });
  }

  static void grad_input(const Geometry& g, const scalar_t* dy, const scalar_t* x, scalar_t* dx,
                         const GradCoefficients<acc_t>& k, bool relu, bool batch_stats,
                         bool stream, int64_t begin, int64_t end, double* run_sum_dy,
                         double* run_sum_dy_xc) {
    with_flags(relu, batch_stats, [&](auto relu_flag, auto batch_stats_flag) {
      constexpr bool kRelu = decltype(relu_flag)::value;
      constexpr bool kBatchStats = decltype(batch_stats_flag)::value;
      // As in normalise: converted outputs are never streamed.
      if (stream && !kConvert) {
        grad_runs<kRelu, false, kBatchStats, !kConvert>(g, dy, x, dx, k, begin, end, run_sum_dy,
                                                        run_sum_dy_xc);
      } else {
        grad_runs<kRelu, false, kBatchStats, false>(g, dy, x, dx, k, begin, end, run_sum_dy,
                                                    run_sum_dy_xc);
      }
    });
  }

  static KernelTable<scalar_t> table() {
    return {&batch_stats, &normalise, &grad_sums, &grad_input};
  }
};

template struct Kernels<float>;
template struct Kernels<double>;
template struct Kernels<c10::BFloat16>;
template struct Kernels<c10::Half>;

#undef AVK_INLINE
#undef AVK_INLINE_LAMBDA
#undef AVKERNELS_COUNT_BY_BITS
