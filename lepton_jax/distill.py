"""Knowledge distillation's teacher (config.objective='distill', config.distill).

The teacher is another model (a lepton run `workdir:DIR[:STEP]` or a Hugging Face directory
`hf:DIR`), of any shape, frozen: its variables are the frozen collection TEACHER of the step,
placed on the student's mesh by its own logical axis names, and the step applies it in the same
jitted function as the student (objectives.distill holds the loss). It may run in bfloat16 or
with int8 weights (lepton_jax/quant.py). It is loaded from its source whenever a run starts, not
copied into the workdir: each checkpoint's meta records the source and a fingerprint of its
values, and a resumed run refuses a teacher whose values changed.

Teacher and student must share one tokenizer (logits are compared token by token): the
vocabularies are compared by size and by the ids they give a probe text.
"""
import dataclasses

import jax
import ml_collections

from lepton_jax import checkpoint, config_lib, data, objectives, pretrained, quant, train_state
from lepton_jax.model import ModelConfig, Transformer
from lepton_jax.model.config import LoraConfig, PruneConfig, QuantConfig

TEACHER = objectives.TEACHER  # The frozen collection of the teacher's variables in the step.
PROBE = 'def f(x):\n    return "naïve café" + str(x)  # 12345\n'  # Both must give the same ids.


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A loaded teacher: what the train step reads besides the run's own variables."""
  variables: dict  # On the mesh; the frozen collection TEACHER of the step.
  reference: dict  # {'source', 'fingerprint'}: recorded in the meta of every checkpoint.

  def step_layout(self, layout: train_state.Layout) -> train_state.Layout:
    """The layout of a step whose frozen variables hold the teacher too (the run's checkpoints
    keep `layout`'s: the teacher is not saved)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.variables)
    shardings = jax.tree.map(lambda x: x.sharding, self.variables)
    return dataclasses.replace(
        layout, frozen=dict(layout.frozen, **{TEACHER: shapes}),
        frozen_shardings=dict(layout.frozen_shardings, **{TEACHER: shardings}))

  def step_frozen(self, frozen: dict) -> dict:
    return dict(frozen, **{TEACHER: self.variables})

  def check_resumed(self, saved: dict | None, workdir: str) -> None:
    """A resumed run distils from the teacher it started with."""
    if saved is not None and saved != self.reference:
      raise ValueError(f'{workdir} was distilled from {saved["source"]} (fingerprint '
                       f'{saved["fingerprint"]}), but config.distill.teacher gives '
                       f'{self.reference["source"]} (fingerprint '
                       f'{self.reference["fingerprint"]}): resume with the teacher it started with')


def source(config: ml_collections.ConfigDict) -> pretrained.Source:
  try:
    return pretrained.parse(config.distill.teacher)
  except ValueError:
    raise ValueError(f'config.distill.teacher={config.distill.teacher!r}: expected '
                     "'workdir:DIR[:STEP]' or 'hf:DIR'") from None


def teacher_model(config: ml_collections.ConfigDict, student: ModelConfig) -> Transformer:
  """The teacher: its source's architecture, run as the student runs (attention, remat) in
  config.distill.teacher_dtype, without dropout, adapters or masks; int8 weights with
  teacher_quant. A lepton run's teacher keeps the layer layout it was saved with (scan_layers)."""
  where = source(config)
  fields, _ = pretrained.source_model_and_tokenizer(where)
  if where.kind == 'workdir':
    fields = dict(fields, scan_layers=config_lib.read_run_config(where.path).model.scan_layers)
  dtype = config.distill.teacher_dtype
  quant_config = QuantConfig(weights=config.distill.teacher_quant)
  return Transformer(dataclasses.replace(
      student, **fields, dropout=0.0, param_dtype=dtype, dtype=dtype, lora=LoraConfig(),
      quant=quant_config, prune=PruneConfig()))


def check_vocabulary(config: ml_collections.ConfigDict, student_tokenizer, student: ModelConfig,
                     teacher: Transformer) -> None:
  """One line naming both vocabularies unless teacher and student share the tokenizer."""
  where = source(config)
  _, tokenizer_fields = pretrained.source_model_and_tokenizer(where)
  teacher_data = ml_collections.ConfigDict(dict(config.data.to_dict(), **tokenizer_fields))
  teacher_tokenizer = data.build_tokenizer(teacher_data, where.path, train_if_missing=False)
  same = (teacher_tokenizer.vocab_size == student_tokenizer.vocab_size and
          teacher.cfg.vocab_size == student.vocab_size and
          teacher_tokenizer.encode(PROBE) == student_tokenizer.encode(PROBE))
  if not same:
    describe = lambda tokenizer, kind, vocab_size: ' '.join(filter(None, (
        kind, tokenizer.path, f'with {tokenizer.vocab_size} tokens, model vocab_size '
        f'{vocab_size}')))
    raise ValueError(
        f'config.distill.teacher={config.distill.teacher!r}: its vocabulary ('
        f'{describe(teacher_tokenizer, teacher_data.tokenizer, teacher.cfg.vocab_size)}) is not '
        f"the student's ({describe(student_tokenizer, config.data.tokenizer, student.vocab_size)})"
        '; distillation compares logits token by token, so both need one tokenizer')


def load_variables(config: ml_collections.ConfigDict, teacher: Transformer, mesh, rules) -> dict:
  """The teacher's variables from its source, on `mesh` by its logical axis names (quantized
  when config.distill.teacher_quant says so)."""
  where = source(config)
  float_model = Transformer(dataclasses.replace(teacher.cfg, quant=QuantConfig()))
  if where.kind == 'hf':
    from lepton_jax import hf  # pylint: disable=g-import-not-at-top  (the hf extra)
    variables = hf.load_variables(where.path, float_model, mesh, rules)
  else:
    reader = checkpoint.Checkpointer(where.path, read_only=True)
    try:
      step = where.step if where.step is not None else reader.latest_step()
      if step not in reader.all_steps():
        raise FileNotFoundError(f'config.distill.teacher: {where.path}/checkpoints has no '
                                f'checkpoint of step {step}; it has steps {reader.all_steps()}')
      abstract = checkpoint.abstract_like(*train_state.abstract_variables(
          float_model, mesh, rules, config.seq_len))
      variables = reader.restore_variables(step, abstract)
    finally:
      reader.close()
  return quant.quantize(float_model, variables, teacher.cfg.quant, mesh, rules)[1]


def load(config: ml_collections.ConfigDict, student_tokenizer, student: ModelConfig, mesh,
         rules) -> Teacher:
  """config.distill.teacher, checked against the student's tokenizer and loaded onto `mesh`."""
  model = teacher_model(config, student)
  check_vocabulary(config, student_tokenizer, student, model)
  variables = load_variables(config, model, mesh, rules)
  return Teacher(variables, {'source': config.distill.teacher,
                             'fingerprint': checkpoint.fingerprint(variables)})
