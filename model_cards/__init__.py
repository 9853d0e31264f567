"""Model card templates rendered by :mod:`peft_quant.model_card` (installed as ``peft_quant.model_cards``)."""
