"""The pages' own words in English and Chinese (--lang en|zh, as ms-swift's web-ui). Flag names and their help
texts come from the flag declarations and stay English, as `tunesmith <command> --help` prints them; messages from
the commands are the CLI's own."""
from __future__ import annotations

EN = {
    "title": "tunesmith", "train": "Train", "runs": "Runs", "chat": "Chat", "export": "Export", "eval": "Eval",
    "method": "Method", "basics": "Basics", "all_flags": "All flags, by group", "upload": "Upload data files",
    "preview": "Preview rows (data inspect)", "stats": "Measure (data stats)", "check": "Check",
    "start": "Start", "command": "Command line (what runs)", "nproc": "Processes (NPROC_PER_NODE)",
    "refresh": "Refresh", "run": "Run", "stop": "Stop", "resume": "Resume from the last checkpoint",
    "compare": "Compare the selected runs (HTML report)", "compare_runs": "Runs to compare",
    "log": "Log (last lines)", "checkpoints": "Checkpoints", "chat_with": "Chat with the last checkpoint",
    "export_this": "Export the last checkpoint", "model": "Model, checkpoint or adapter",
    "adapters": "Adapters (LoRA checkpoints, space-separated)", "load": "Load", "system": "System prompt",
    "tools": "Tools (OpenAI JSON list, optional)", "message": "Message", "send": "Send", "clear": "Clear",
    "sampling": "Sampling", "reasoning": "Reasoning", "tool_call": "Tool call", "status": "Status",
    "no_model": "No model loaded: pick a model or checkpoint and press Load.",
    "no_runs": "No runs yet under the output folders.", "loading": "loading…",
    "export_kind": "Export", "eval_datasets": "Benchmarks (--eval_dataset)", "eval_result": "Result",
    "started": "started", "not_selected": "Select a run.",
}

ZH = {
    "title": "tunesmith", "train": "训练", "runs": "运行记录", "chat": "对话", "export": "导出", "eval": "评测",
    "method": "训练方法", "basics": "常用参数", "all_flags": "全部参数（按分组）", "upload": "上传数据文件",
    "preview": "预览数据（data inspect）", "stats": "数据统计（data stats）", "check": "检查参数",
    "start": "开始训练", "command": "命令行（实际运行的命令）", "nproc": "进程数（NPROC_PER_NODE）",
    "refresh": "刷新", "run": "运行", "stop": "停止",
    "resume": "从最后的检查点继续",
    "compare": "对比所选运行（HTML 报告）", "compare_runs": "要对比的运行",
    "log": "日志（最后几行）", "checkpoints": "检查点", "chat_with": "用最后的检查点对话",
    "export_this": "导出最后的检查点", "model": "模型、检查点或适配器",
    "adapters": "适配器（LoRA 检查点，空格分隔）", "load": "加载", "system": "系统提示词",
    "tools": "工具（OpenAI JSON 列表，可选）", "message": "消息", "send": "发送",
    "clear": "清空",
    "sampling": "采样参数", "reasoning": "思考过程", "tool_call": "工具调用",
    "status": "状态",
    "no_model": "尚未加载模型：选择模型或检查点后点击“加载”。",
    "no_runs": "输出目录下还没有运行记录。", "loading": "加载中…",
    "export_kind": "导出方式", "eval_datasets": "评测集（--eval_dataset）",
    "eval_result": "结果",
    "started": "开始于", "not_selected": "请选择一个运行。",
}


def labels(lang: str) -> dict:
    """The words of the pages in `lang` (en or zh; anything else: en)."""
    return ZH if lang == "zh" else EN
