"""The training methods, one object a file: SFT, DPO (and its variants), CPO/SimPO, ORPO, KTO, reward models."""
