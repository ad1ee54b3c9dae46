"""A fine-tuned text-to-image model audited end to end (recipe finetune_t2i).

The setting of "Noise as a Probe" and of the OMS paper's Stable Diffusion
tables: a Stable-Diffusion-architecture model pretrained on public captioned
images, fine-tuned on a few hundred private ones, exported as diffusers
folders, converted and audited like a user's own. The pretrained model is
the negative control (its "members" were never trained on).

Reduced (CPU, offline). Fashion-MNIST comes from Debian's package:

    apt-get update && apt-get install -y dataset-fashion-mnist
    python experiments/recipe.py --config experiments/configs/finetune_t2i.py:reduced \
        --workdir runs/t2i

writes W/data (members/nonmembers/public .npz, captions.jsonl), W/tokenizer,
W/pretrained/diffusers and W/finetuned/diffusers (StableDiffusionPipeline
folders), W/<model>/checkpoint (experiments/convert.py), W/<model>/audit
(experiments/attack.py: Naive, SecMI, PIA, PIAN with OMS 0..2, probe and
probe_forward with the captions, GSA with shadow.count shadow fine-tunes
W/shadow<i> of the pretrained model on public images held out of
pretraining) and W/report.md. The exact commands run are
in W/<model>/commands.log. Re-running resumes. ``:tiny`` is the test size.
Add ``--config.finetune.lora_rank=8`` for a LoRA fine-tune as well
(W/finetuned_lora, converted with --lora and audited; about 10 min more).

Full (a real SD1.5 / SD2.1 model and your own captioned fine-tuning set, on
a GPU). Nothing is trained; give the two diffusers folders and the data:

    python experiments/recipe.py --config experiments/configs/finetune_t2i.py:full \
        --workdir runs/t2i_sd15 \
        --config.models.pretrained=/models/stable-diffusion-v1-5 \
        --config.models.finetuned=/models/my-finetune \
        --config.audit.members=data/members.npz \
        --config.audit.nonmembers=data/nonmembers.npz \
        --config.audit.captions=data/captions.jsonl \
        --config.audit.shadow_checkpoints="('ckpts/shadow0','ckpts/shadow1')"

(members / non-members: .npz with images [N, 512, 512, 3], ids, or image
folders; captions: id -> caption). GSA needs shadow fine-tunes: copies of
the pretrained model fine-tuned with your recipe on public images, each
converted with ``experiments/convert.py --format stable_diffusion --source
SHADOW --trained_on pool.npz:members:seed=1 --held_out
pool.npz:nonmembers:seed=1 --output ckpts/shadow0``; or drop gsa from
``--config.audit.attacks``. GPU notes: one 40-80 GB accelerator runs
batch 4-8 at 512 px in float32; ``--config.audit.attack_options`` can add
``probe.sample_steps=50`` etc.; the probe costs inversion + sampling steps
(100 UNet calls per image at the defaults), the loss attacks 2-4.
"""

import ml_collections
from ml_collections import config_dict

TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {}",
             "a grey {} on black", "a product photo of a {}")


def get_config(arg: str = "reduced") -> ml_collections.ConfigDict:
  variant = arg or "reduced"
  if variant not in ("reduced", "tiny", "full"):
    raise ValueError(f"finetune_t2i: unknown variant {variant!r}; expected "
                     "reduced, tiny or full")
  c = ml_collections.ConfigDict()
  c.name = "finetune_t2i"
  c.description = ("fine-tuned text-to-image model: loss attacks, OMS and "
                   "the initial-noise probe vs a pretrained-only control")
  c.paper = "Noise as a Probe; OMS Tables 3 and 6 setting"
  c.kind = "finetune_t2i"
  c.variant = variant
  c.requires = ()
  c.seed = 0
  # User models (full): diffusers folders; when set, nothing is trained.
  c.models = ml_collections.ConfigDict()
  c.models.pretrained = config_dict.placeholder(str)
  c.models.finetuned = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.dir = "/usr/share/datasets/fashion-mnist"
  c.data.resolution = 32
  c.data.templates = TEMPLATES
  c.data.split_seed = 0
  c.data.num_public = 4000
  c.data.num_members = 200
  c.data.num_nonmembers = 200

  c.tokenizer = ml_collections.ConfigDict(dict(vocab_size=300))
  c.schedule = ml_collections.ConfigDict(dict(
      kind="scaled_linear", num_timesteps=1000, beta_start=0.00085,
      beta_end=0.012))
  # 32x32x3 -> 8x8x4 latents (factor 4).
  c.vae = ml_collections.ConfigDict()
  # Sizes measured on 2 cores (s per training step): VAE (32, 64, 64) at
  # batch 64: 5.5; (16, 32, 32) at batch 32: 0.46. UNet (64, 128) at batch
  # 64: 1.1; (32, 64): 0.51.
  c.vae.model = dict(block_out_channels=(16, 32, 32), layers_per_block=1,
                     norm_num_groups=16, latent_channels=4)
  c.vae.kl_weight = 1e-4
  c.vae.train = _train(2e-3, 32, 600)
  c.text = ml_collections.ConfigDict()
  c.text.model = dict(vocab_size=320, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=16, hidden_act="quick_gelu")
  c.unet = ml_collections.ConfigDict()
  c.unet.model = dict(block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D",
                                        "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D",
                                      "CrossAttnUpBlock2D"),
                      num_attention_heads=(4, 4),
                      transformer_layers_per_block=(1, 1),
                      norm_num_groups=16)
  c.unet.p_uncond = 0.1
  # Pretraining: 24 epochs over the public images (1500 x 64 / 4000). With
  # 1000 steps (16 epochs) :reduced took 37.8 min but the fine-tuned
  # model leaked less (probe AUC 0.890 instead of 0.921; README).
  c.unet.train = _train(1e-3, 64, 1500)
  # Fine-tuning: many epochs over the members (1500 x 32 / 200 = 240).
  c.finetune = ml_collections.ConfigDict()
  c.finetune.train = _train(5e-4, 32, 1500)
  # LoRA fine-tune (rank > 0): also trained, exported as a diffusers LoRA
  # file on the pretrained folder, converted with --lora and audited. Off in
  # :reduced for its time budget; --config.finetune.lora_rank=8 adds
  # it (about 10 more minutes on 2 cores).
  c.finetune.lora_rank = 0
  c.finetune.lora_alpha = 8.0
  c.finetune.lora_train = _train(1e-3, 32, 1500)

  # GSA shadows: fine-tunes of the pretrained UNet on seeded halves of a
  # pool of 2 x num_members public images held out of pretraining.
  c.shadow = ml_collections.ConfigDict(dict(count=1, split_seed=100))

  c.audit = ml_collections.ConfigDict()
  c.audit.attacks = ("naive", "secmi", "pia", "pian", "probe",
                     "probe_forward", "gsa")
  c.audit.oms_steps = 2
  c.audit.seed = 0
  c.audit.batch_size = 50
  c.audit.bootstrap = 200
  c.audit.max_samples = config_dict.placeholder(int)
  c.audit.members = config_dict.placeholder(str)
  c.audit.nonmembers = config_dict.placeholder(str)
  c.audit.captions = config_dict.placeholder(str)
  # User models (full) with gsa: converted shadow checkpoints.
  c.audit.shadow_checkpoints = ()
  # GSA at its own default depths 0..1, not the loss attacks' 0..2, and at
  # 5 timesteps (every 200) instead of the papers' 10 (every 100): 15
  # forward + 15 backward UNet passes per sample instead of 30 + 30 (or
  # 60 + 60), towards the 45-min budget on 2 cores.
  c.audit.attack_options = ("gsa.oms_steps=1",
                            "gsa.timesteps=[199,399,599,799,999]")
  # Independent steps (the fine-tunes of the pretrained model, the audits)
  # run as this many processes at once (mia_jax.recipes.processes); 1 runs
  # them in turn. The README gives :reduced's time on 2 cores with 2.
  c.workers = 2

  if variant == "full":  # the papers' 10 GSA timesteps; one accelerator:
    c.audit.attack_options = ("gsa.oms_steps=1",)  # the audits take turns
    c.workers = 1
  if variant == "tiny":
    c.data.num_public, c.data.num_members, c.data.num_nonmembers = 64, 16, 16
    c.tokenizer.vocab_size = 200
    c.text.model = dict(vocab_size=256, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=1, num_attention_heads=2,
                        max_position_embeddings=16, hidden_act="quick_gelu")
    c.vae.model = dict(block_out_channels=(8, 8, 8), layers_per_block=1,
                       norm_num_groups=4, latent_channels=4)
    c.unet.model = dict(block_out_channels=(8, 16), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D",
                                          "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                        num_attention_heads=(2, 2),
                        transformer_layers_per_block=(1, 1),
                        norm_num_groups=4)
    c.vae.train = _train(2e-3, 16, 4)
    c.unet.train = _train(1e-3, 16, 4)
    c.finetune.train = _train(1e-3, 16, 4)
    c.finetune.lora_rank = 2  # the LoRA path stays tested
    c.finetune.lora_alpha = 4.0
    c.finetune.lora_train = _train(1e-3, 16, 4)
    c.audit.batch_size = 16
    c.audit.bootstrap = 10
    c.audit.attack_options = ("probe.inversion_steps=2",
                              "probe.sample_steps=2",
                              "probe_forward.sample_steps=2",
                              "gsa.timesteps=[499,999]", "gsa.oms_steps=1")
  return c


def _train(lr, batch_size, num_steps):
  return ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=min(100, num_steps), grad_clip=1.0,
      batch_size=batch_size, num_steps=num_steps, ema_decay=0.0,
      log_every=max(1, min(100, num_steps)),
      checkpoint_every=max(1, min(500, num_steps))))
