"""rlchat: distributed PPO for chat language models on Ray.

The core (config, tokenizer, data, model, generation, rewards, ppo, checkpoint, metrics) never imports Ray; the
distributed layer (rollout, learner, trainer, stages, prepare) does.
"""

import os

# transformers / huggingface_hub draw a progress bar for every tiny local load and save ("Loading weights",
# "Writing model shards"); in rlchat they are noise between our own progress lines. Users can set it to 0.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
