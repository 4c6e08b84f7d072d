"""ghibli_lab: Hydra-configured LoRA fine-tuning experiments for SDXL and SD 1.5."""

import logging


class _DropMessages(logging.Filter):
    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(part in message for part in self.starts)


# Noise users saw on every command, set up before the libraries load (plain logging, nothing heavy):
# transformers warns that torchvision is missing whenever diffusers touches CLIPImageProcessor (the
# PIL fallback it takes is what we want), and diffusers warns "No LoRA keys ... open an issue" for
# every text encoder a UNet-only LoRA file has no keys for.
logging.getLogger("transformers.utils.import_utils").addFilter(_DropMessages("requires torchvision (not installed); falling back"))
for _name in ("diffusers.loaders.lora_base", "diffusers.loaders.peft"):
    logging.getLogger(_name).addFilter(_DropMessages("No LoRA keys associated to"))
