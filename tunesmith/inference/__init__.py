"""Generation as a library: the continuous-batching engine, chat rendering and reply parsing, and the accelerated
backends (vLLM, SGLang, LMDeploy). Used by infer, deploy, eval and GRPO's rollouts; never imports training."""
