"""`tunesmith web-ui` and `tunesmith app`: the browser pages (gradio, the optional extra `tunesmith[webui]`).

Layer: may import config, data, models, runs, inference, serve, eval and the base modules; never commands or train.
Training, export, eval and the data previews run as `tunesmith` command lines in their own processes (launch.py),
so the pages start nothing the CLI would not; the one-message flag check is the commands' own, handed in by
tunesmith.commands.web_ui. Modules: flags.py (the forms, from the flag groups), builder.py (method → command
line), launch.py (detached processes, pid records, stop), runs.py (run discovery and state), curves.py
(downsampling), paths.py (the folders the page may touch), context.py (what the pages share; `validate`, the one
path from a command line to the message under a form), chat.py (streaming over the deploy engine), labels.py
(en/zh), and the pages: train_page.py, runs_page.py, chat_page.py, tasks_page.py (export, eval), app.py (assembly,
security, launch).
"""
