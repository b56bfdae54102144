from recbole_llm.cli import entry

entry()
