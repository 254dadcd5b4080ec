"""Training, evaluation and model surgery for the GDN-replacement recipe."""

import warnings

# CompressAI 1.2.8 calls torch.jit.script at import time; newer torch warns on every run.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
