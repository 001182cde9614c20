"""The KV-cache decoder: cached logits equal the full forward pass for every model variant, padded
batches equal their rows alone, sampling, stopping, slots, meshes, one-line errors, and parity with
transformers' generate."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lepton_jax import generate, sharding, train_state
from lepton_jax.model import ModelConfig, Transformer, attention
from tests.conftest import tiny_config

VOCAB = 64
LENGTHS = (3, 9, 14)  # Prompts of unequal lengths: one shorter, two longer than WINDOW.
STEPS = 6  # Decode steps after the prefill.
WINDOW = 5
# Every attention and position feature, three models (each variant costs three compilations).
VARIANTS = {
    # Original context 8: the llama3 rescaled frequencies change logits well within 32 positions.
    'llama3_rope_gqa_qk_norm_qkv_bias': dict(
        num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True, qkv_bias=True,
        rope_scaling='llama3', rope_scaling_factor=4.0, rope_original_max_len=8,
        attention='dot_product'),
    'gpt2_learned_positions_mha': dict(
        num_kv_heads=2, positions='learned', norm='layernorm', mlp='gelu', qkv_bias=True,
        out_bias=True, mlp_bias=True, tie_embeddings=True),
    'mistral_window_ring_mqa_scanned': dict(sliding_window=WINDOW, scan_layers=True, remat='full'),
}


def tiny_model(**fields) -> Transformer:
  config = tiny_config(**{f'model.{k}': v for k, v in {'vocab_size': VOCAB, **fields}.items()})
  return Transformer(ModelConfig.from_config(config.model))


def init(model: Transformer, seed: int = 0) -> dict:
  return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))


def random_tokens(shape, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def cached_logits(model, variables, tokens_BT, lengths_B, cache_len: int) -> list[jax.Array]:
  """[B, V] logits of the prefill (each row's last prompt token), then of each decode step that
  feeds row b its tokens_BT[b, lengths_B[b] + step]."""
  @jax.jit
  def prefill(tokens_BT):
    return model.apply(variables, tokens_BT, cache=attention.Prefill(lengths_B, cache_len),
                       mutable=['cache'])

  @jax.jit
  def decode(cache, tokens_B1, positions_B1):
    return model.apply({**variables, 'cache': cache}, tokens_B1, positions_B1,
                       cache=attention.Decode(), mutable=['cache'])

  logits_B1V, mutated = prefill(tokens_BT[:, :lengths_B.max()])
  logits = [logits_B1V[:, 0]]
  for step in range(tokens_BT.shape[1] - lengths_B.max()):
    positions_B = lengths_B + step
    logits_B1V, mutated = decode(mutated['cache'],
                                 tokens_BT[np.arange(len(lengths_B)), positions_B][:, None],
                                 positions_B[:, None])
    logits.append(logits_B1V[:, 0])
  return logits


@pytest.mark.parametrize('variant', VARIANTS)
def test_logits_at_every_decode_step_equal_the_full_forward_pass(variant):
  model = tiny_model(**VARIANTS[variant])
  variables = init(model)
  lengths_B = np.array(LENGTHS, np.int32)
  tokens_BT = random_tokens((len(LENGTHS), max(LENGTHS) + STEPS))  # Past a row's length: padding.
  full_BTV = jax.jit(model.apply)(variables, tokens_BT)
  rows_B = np.arange(len(LENGTHS))
  # A windowed model also runs with a cache as long as the sequence (as a server's may be), where
  # the mask, not the ring, must hide what left the window.
  cache_lengths = {generate.cache_length(model.cfg, tokens_BT.shape[1]), tokens_BT.shape[1]}
  assert min(cache_lengths) == (WINDOW if model.cfg.sliding_window else tokens_BT.shape[1])
  for cache_len in cache_lengths:
    logits = cached_logits(model, variables, tokens_BT, lengths_B, cache_len)
    for step, logits_BV in enumerate(logits):
      np.testing.assert_allclose(logits_BV, full_BTV[rows_B, lengths_B - 1 + step], atol=1e-5,
                                 rtol=1e-5, err_msg=f'{cache_len} slots, step {step}')


# --- generate ---------------------------------------------------------------------------------

NEW = 10  # max_new_tokens of every generate call below: one compiled decode loop per batch size.
RING = VARIANTS['mistral_window_ring_mqa_scanned']


@pytest.fixture(scope='module')
def ring_model():
  """(model, variables, prompts): the sliding-window ring under scanned layers, the most
  bookkeeping a row has, and prompts of LENGTHS tokens."""
  model = tiny_model(**RING)
  return model, init(model), [random_tokens(n, seed=n).tolist() for n in LENGTHS]


def test_greedy_padded_batch_equals_each_prompt_alone(ring_model):
  model, variables, prompts = ring_model
  batch = generate.generate(model, variables, prompts, NEW)
  assert batch == [generate.generate(model, variables, [p], NEW)[0] for p in prompts]
  assert [len(new) for new in batch] == [NEW] * len(prompts)  # No stop token: the full budget.
  assert len(set(map(tuple, batch))) == len(prompts)


def test_rows_end_before_their_first_stop_token(ring_model):
  model, variables, prompts = ring_model
  free = generate.generate(model, variables, prompts, NEW)
  stop = free[0][3]
  expected = [new[:new.index(stop)] if stop in new else new for new in free]
  assert generate.generate(model, variables, prompts, NEW, eos_id=stop) == expected
  assert generate.generate(model, variables, prompts, NEW, stop_ids=[stop, VOCAB + 1]) == expected
  assert len(expected[0]) <= 3 and any(len(new) == NEW for new in expected)


def test_sampling_is_reproducible_from_the_seed(ring_model):
  model, variables, prompts = ring_model
  sample = lambda **kw: generate.generate(model, variables, prompts, NEW, temperature=1.0, **kw)
  assert sample(seed=0) == sample(seed=0) != sample(seed=1)
  assert sample(seed=0, top_k=1) == generate.generate(model, variables, prompts, NEW)
  assert sample(seed=0, top_p=0.5, min_p=0.1) == sample(seed=0, top_p=0.5, min_p=0.1)


def settings(**per_row) -> generate.Sampling:
  """Sampling settings with a value per row for each keyword, the defaults elsewhere."""
  rows = len(next(iter(per_row.values())))
  base = generate.sampling(rows, temperature=1.0)
  return base.replace(**{f'{k}_B': jnp.asarray(v, getattr(base, f'{k}_B').dtype)
                         for k, v in per_row.items()})


def test_top_k_top_p_min_p_keep_what_transformers_keeps():
  probs_V = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BV = jnp.tile(jnp.log(probs_V), (6, 1))
  kept = generate.filter_logits(logits_BV, settings(
      top_k=[3, 0, 0, 2, 0, 0], top_p=[1, 0.5, 1, 0.9, 0.9, 1], min_p=[0, 0, 0.5, 0, 0, 0]))
  np.testing.assert_array_equal(np.isfinite(kept), [
      [1, 1, 1, 0],  # top_k 3
      [1, 0, 0, 0],  # top_p 0.5: the first token already holds half the mass.
      [1, 1, 0, 0],  # min_p 0.5: at least half the top token's probability.
      [1, 1, 0, 0],  # top_k 2 then top_p 0.9 of what is left (0.625 + 0.375).
      [1, 1, 1, 0],  # top_p 0.9 alone: 0.5 + 0.3 + 0.15.
      [1, 1, 1, 1]])


def test_draws_follow_the_temperature_and_greedy_rows_stay_greedy():
  rows = 4000
  logits_BV = jnp.tile(jnp.log(jnp.array([1.0, 2.0, 3.0])), (rows, 1))
  temperature_B = np.where(np.arange(rows) % 2, 2.0, 0.0)
  drawn_B = np.asarray(generate.draw(logits_BV, settings(temperature=temperature_B),
                                     jnp.zeros(rows, jnp.int32)))
  assert (drawn_B[::2] == 2).all()
  expected = np.sqrt([1.0, 2.0, 3.0]) / np.sqrt([1.0, 2.0, 3.0]).sum()  # p^(1/2), renormalized.
  np.testing.assert_allclose(np.bincount(drawn_B[1::2], minlength=3) / (rows // 2), expected,
                             atol=0.03)


def test_a_request_inserted_into_a_free_slot_mid_decode_decodes_as_alone(ring_model):
  """The serving pattern: prefill a request, insert it into a free slot of a running batch."""
  model, variables, prompts = ring_model
  first, second = prompts[0], prompts[2]
  alone = [generate.generate(model, variables, [p], NEW)[0] for p in (first, second)]
  stops, cache_len = generate.stop_array([]), generate.cache_length(model.cfg, 32)

  def prefill(prompts, max_new):
    tokens_BT, lengths_B = generate.pad_prompts(prompts, len(prompts), 16)
    return generate.prefill(model, variables, tokens_BT, lengths_B, cache_len,
                            generate.sampling(len(prompts)), np.asarray(max_new), stops)

  state = prefill([first, [0]], [NEW, 1])  # Slot 1 holds a request that ends at once: free.
  drawn = [[int(state.tokens_B[0])], []]
  for step in range(2 * NEW):
    if step == 3:
      assert bool(state.done_B[1])
      state = generate.insert(state, prefill([second], [NEW]), 1)
      drawn[1].append(int(state.tokens_B[1]))
    before_B = np.asarray(state.num_new_B)
    state = generate.decode_step(model, variables, state, stops)
    for slot in np.flatnonzero(np.asarray(state.num_new_B) > before_B):
      drawn[slot].append(int(state.tokens_B[slot]))
  assert drawn == alone and bool(state.done_B.all())


def test_generation_in_a_mesh_equals_one_device():
  model = tiny_model(num_heads=4, num_kv_heads=2, head_dim=8)
  variables = init(model)
  prompts = [random_tokens(n, seed=n).tolist() for n in LENGTHS]
  greedy, sampled = (generate.generate(model, variables, prompts, NEW, temperature=t)
                     for t in (0.0, 1.0))
  config = tiny_config(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2})
  mesh, rules = sharding.make_mesh(config.mesh), config.mesh.rules
  with sharding.use_mesh(mesh, rules):
    shardings = train_state.abstract_variables(model, mesh, rules, 8)[1]
    variables = jax.device_put(variables, shardings)
    assert generate.generate(model, variables, prompts, NEW) == greedy
    assert generate.generate(model, variables, prompts, NEW, temperature=1.0) == sampled
    tokens_BT, lengths_B = generate.pad_prompts(prompts, 4, 16)  # 4: batch over data x fsdp.
    state = generate.prefill(model, variables, tokens_BT, lengths_B, 32, generate.sampling(4),
                             np.full(4, NEW), generate.stop_array([]))
  cached = state.cache['layers_0']['attn']['cached_key']
  assert cached.names == attention.CACHE_AXES
  assert cached.value.sharding.is_equivalent_to(
      NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None)), cached.value.ndim)


def test_bfloat16_decodes_as_its_full_forward_pass():
  model = tiny_model(dtype='bfloat16')
  variables = init(model)
  lengths_B = np.array(LENGTHS, np.int32)
  tokens_BT = random_tokens((len(LENGTHS), max(LENGTHS) + STEPS))
  full_BTV = jax.jit(model.apply)(variables, tokens_BT)
  scale = float(jnp.abs(full_BTV).max())
  logits = cached_logits(model, variables, tokens_BT, lengths_B, tokens_BT.shape[1])
  for step, logits_BV in enumerate(logits):
    expected_BV = full_BTV[np.arange(len(LENGTHS)), lengths_B - 1 + step]
    np.testing.assert_allclose(logits_BV, expected_BV, atol=0.02 * scale, rtol=0)
    np.testing.assert_array_equal(logits_BV.argmax(-1), expected_BV.argmax(-1))


@pytest.mark.parametrize('prompts, max_new_tokens, sampling, message', [
    ([], NEW, {}, 'prompt_tokens is empty: give at least one prompt'),
    ([[1], []], NEW, {}, 'prompt 1 is empty'),
    ([[1] * 33], 1, {}, r'prompt 0 has 33 tokens; the model has positions for 32 \(max_seq_len\)'),
    ([[1] * 20, [1]], 14, {}, 'max_new_tokens=14 overflows the cache: after a prompt of 20 '
     'tokens the model has positions for 13 more'),
    ([[1]], 0, {}, 'max_new_tokens=0: must be at least 1'),
    ([[1, VOCAB]], NEW, {}, f'prompt 0 holds token {VOCAB}, outside the vocabulary'),
    ([[1]], NEW, {'temperature': -1.0}, 'temperature=-1.0: must be >= 0'),
    ([[1]], NEW, {'top_k': -2}, 'top_k=-2: must be >= 0'),
    ([[1]], NEW, {'top_p': 0.0}, r'top_p=0.0: must be in \(0, 1\]'),
    ([[1]], NEW, {'min_p': 1.5}, r'min_p=1.5: must be in \[0, 1\]'),
])
def test_bad_input_is_a_one_line_error_naming_it(prompts, max_new_tokens, sampling, message):
  model = tiny_model()
  with pytest.raises(ValueError, match=message) as error:
    generate.generate(model, {}, prompts, max_new_tokens, **sampling)
  assert '\n' not in str(error.value)


# --- parity with transformers -------------------------------------------------------------------

HF_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
HF_FAMILIES = {  # Each family's own feature; Mistral's window is shorter than the prompts.
    'llama': lambda transformers: transformers.LlamaConfig(**HF_DECODER),
    'mistral_sliding_window': lambda transformers: transformers.MistralConfig(
        **HF_DECODER, sliding_window=4),
    'qwen2_qkv_bias': lambda transformers: transformers.Qwen2Config(**HF_DECODER),
    'qwen3_qk_norm': lambda transformers: transformers.Qwen3Config(**HF_DECODER, head_dim=12),
    'gpt2': lambda transformers: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                         n_head=4, n_positions=64),
}


@pytest.mark.parametrize('family', HF_FAMILIES)
def test_greedy_tokens_equal_transformers_generate(family, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from lepton_jax import hf  # pylint: disable=g-import-not-at-top  (needs the hf extra)
  torch.manual_seed(0)
  reference = transformers.AutoModelForCausalLM.from_config(
      HF_FAMILIES[family](transformers)).eval()
  with torch.no_grad():  # Biases and norm weights away from their zero/one init.
    for name, param in reference.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'ln_' in name:
        param.add_(0.2 * torch.randn_like(param))
  reference.save_pretrained(tmp_path)
  model, variables = hf.load(str(tmp_path))
  prompts = [random_tokens(n, seed=n).tolist() for n in (5, 11)]
  eos = reference.generation_config.eos_token_id
  new = generate.generate(model, variables, prompts, 12, eos_id=eos)
  for prompt, tokens in zip(prompts, new):
    with torch.no_grad():
      output = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                  do_sample=False, max_new_tokens=12, pad_token_id=0)
    expected = output[0, len(prompt):].tolist()
    assert tokens == (expected[:expected.index(eos)] if eos in expected else expected)
