"""Seeded synthetic logs of agents that keep their instructions out of the system prompt (openai import format).

- ``template_log``: a MetaGPT-style multi-role agent. No system prompt; every call's single user message is one
  of several prompt templates ("NOTICE\\nRole: You are a professional engineer; ...") with variable fields filled
  in: requirements, code blocks, file names, project and people's names, numbers. ``metadata.template`` is the
  ground truth (the clusterer never sees metadata: the benchmark strips it).
- ``react_log``: ReAct-prompt agents (LangChain's "Answer the following questions as best you can. You have
  access to the following tools: ..." prompt as one user message, scratchpad appended), three agents with their
  own tool sets; each answer is a ``Thought/Action/Action Input`` step or a ``Final Answer``.
  ``metadata.agent`` and ``metadata.action`` are the ground truth.

Both are deterministic in ``seed`` and use only invented names and data.
"""

from __future__ import annotations

import json
import random
from typing import Any

FIRST = ("Alice", "Bob", "Carmen", "Deepak", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
         "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara")
LAST = ("Johnson", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Novak", "Silva", "Schmidt", "Rossi", "Kowalski",
        "Haddad", "Petrov", "Nguyen", "Fischer", "Costa")
PRODUCTS = ("snake game", "todo list web app", "markdown editor", "weather dashboard", "recipe recommender",
            "expense tracker", "chat room server", "pomodoro timer", "url shortener", "image resizer CLI",
            "quiz generator", "inventory manager", "habit tracker", "music playlist organiser", "flashcard app")
FEATURES = ("user accounts", "a dark mode", "CSV export", "keyboard shortcuts", "offline support", "sharing links",
            "a search box", "daily reminders", "charts of weekly totals", "undo and redo", "drag and drop",
            "multi-language support", "an admin page", "rate limiting", "email notifications")
MODULES = ("main", "game", "models", "views", "storage", "api", "utils", "cli", "scheduler", "parser")
VERBS = ("load", "save", "update", "render", "parse", "validate", "compute", "fetch", "sort", "merge")
NOUNS = ("score", "board", "items", "config", "user", "session", "report", "queue", "entry", "cache")


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _code(rng: random.Random, lines: int | None = None) -> str:
    out = []
    for _ in range(lines or rng.randint(2, 4)):
        v, n = rng.choice(VERBS), rng.choice(NOUNS)
        out.append(f"def {v}_{n}(self, {rng.choice(NOUNS)}_id: int) -> dict:\n"
                   f"    \"\"\"{v.capitalize()} the {n}.\"\"\"\n"
                   f"    result = self.{rng.choice(NOUNS)}.get({rng.choice(NOUNS)}_id, {rng.randint(0, 99)})\n"
                   f"    return {{\"{n}\": result, \"count\": {rng.randint(1, 500)}}}\n")
    return "\n".join(out)


def _requirement(rng: random.Random) -> str:
    feats = rng.sample(FEATURES, rng.randint(2, 4))
    return (f"Build a {rng.choice(PRODUCTS)} for {_name(rng)}'s team of {rng.randint(3, 40)} people, with "
            + ", ".join(feats[:-1]) + f" and {feats[-1]}. It must run on Python 3.{rng.randint(8, 12)} and be "
            f"ready by {rng.choice(('Monday', 'Friday', 'the end of the month', 'next sprint'))}.")


def _file(rng: random.Random) -> str:
    return f"{rng.choice(MODULES)}.py"


# --- template-in-user-turn agent (MetaGPT style) ----------------------------------------------------------------
# Each template: (name, weight, prompt builder, answer builder). The fixed text is what MetaGPT's actions send.

def _prd(rng):
    req = _requirement(rng)
    prompt = ("\n## context\n\n### Project Name\n" + rng.choice(PRODUCTS).replace(" ", "_") +
              "\n\n### Original Requirements\n" + req + "\n\n### Search Information\n-\n\n-----\n\n"
              "## format example\n[CONTENT]\n{\"Language\": \"en_us\", \"Original Requirements\": \"\", "
              "\"Product Goals\": [], \"User Stories\": [], \"Competitive Analysis\": []}\n[/CONTENT]\n\n"
              "## nodes: \"<node>: <type>  # <instruction>\"\n- Language: <class 'str'>  # Provide the language used "
              "in the project, typically matching the user's requirement language.\n- Product Goals: "
              "typing.List[str]  # Provide up to three clear, orthogonal product goals.\n- User Stories: "
              "typing.List[str]  # Provide up to 3 to 5 scenario-based user stories.\n\n## constraint\nLanguage: "
              "Please use the same language as Human INPUT.\nFormat: output wrapped inside [CONTENT][/CONTENT] like "
              "format example, nothing else.\n\n## action\nFollow instructions of nodes, generate output and make "
              "sure it follows the format example.\n")
    answer = json.dumps({"Language": "en_us", "Original Requirements": req,
                         "Product Goals": ["Fast", "Simple"], "User Stories": ["As a user I want it to work"],
                         "Competitive Analysis": ["Product A"]})
    return prompt, answer


def _design(rng):
    req = _requirement(rng)
    prompt = ("NOTICE\nRole: You are an architect; the goal is to design a state-of-the-art PEP8-compliant python "
              "system; make the best use of good open source tools.\nRequirement: Fill in the following missing "
              "information based on the context, note that all sections are response with code form separately\n"
              "Max Output: 8192 chars or 2048 tokens. Try to use them up.\nAttention: Use '##' to split sections, "
              "not '#', and '## <SECTION_NAME>' SHOULD WRITE BEFORE the code and triple quote.\n\n## Context\n"
              "[Product Requirement Document]\n" + req + "\n\n## Implementation approach: Provide as Plain text. "
              "Analyze the difficult points of the requirements, select the appropriate open-source framework.\n\n"
              "## Python package name: Provide as Python str with python triple quote, concise and clear.\n\n"
              "## File list: Provided as Python list[str], the list of files needed to write the program.\n\n"
              "## Data structures and interface definitions: Use mermaid classDiagram code syntax.\n")
    answer = ("## Implementation approach\nWe will use Flask and SQLite.\n\n## Python package name\n```python\n\""
              + rng.choice(PRODUCTS).replace(" ", "_") + "\"\n```\n\n## File list\n```python\n[\"main.py\", \""
              + _file(rng) + "\"]\n```\n")
    return prompt, answer


def _write_code(rng):
    fname = _file(rng)
    prompt = ("NOTICE\nRole: You are a professional engineer; the main goal is to write PEP8 compliant, elegant, "
              "modular, easy to read and maintain Python 3.9 code (but you can also use other programming "
              "language)\nATTENTION: Use '##' to SPLIT SECTIONS, not '#'. Output format carefully referenced "
              "\"Format example\".\n\n## Code: " + fname + " Write code with triple quoto, based on the following "
              "list and context.\n1. Do your best to implement THIS ONLY ONE FILE. ONLY USE EXISTING API. IF NO "
              "API, IMPLEMENT IT.\n2. Requirement: Based on the context, implement one following code file, note to "
              "return only in code form, your code will be part of the entire project, so please implement "
              "complete, reliable, reusable code snippets\n3. Attention1: If there is any setting, ALWAYS SET A "
              "DEFAULT VALUE, ALWAYS USE STRONG TYPE AND EXPLICIT VARIABLE.\n\n-----\n# Context\n"
              + _requirement(rng) + "\n\n## Legacy code\n```python\n" + _code(rng) + "```\n-----\n"
              "## Format example\n-----\n## Code: " + fname + "\n```python\n## " + fname + "\n...\n```\n-----\n")
    return prompt, "## Code: " + fname + "\n```python\n" + _code(rng, 3) + "```"


def _review(rng):
    fname = _file(rng)
    prompt = ("NOTICE\nRole: You are a professional software engineer, and your main task is to review and revise "
              "the code. You need to ensure that the code conforms to the google-style standards, is elegantly "
              "designed and modularized, easy to read and maintain.\nLanguage: Please use the same language as the "
              "user requirement, but the title and code should be still in English.\nATTENTION: Use '##' to SPLIT "
              "SECTIONS, not '#'. Output format carefully referenced \"Format example\".\n\n# Context\n## System "
              "Design\n" + _requirement(rng) + "\n\n## Code Files\n----- " + fname + "\n```python\n" + _code(rng)
              + "```\n\n## Code Review: Ordered List. Based on the \"Code to be Reviewed\", provide key, clear, "
              "concise, and specific answer. If any answer is no, explain how to fix it step by step.\n1. Is the "
              "code implemented as per the requirements?\n2. Is the code logic completely correct?\n3. Does the "
              "existing code follow the \"Data structures and interfaces\"?\n\n## Code Review Result: str. If the "
              "code doesn't have bugs, we don't need to rewrite it, so answer LGTM and stop. ONLY ANSWER LGTM/LBTM.\n")
    return prompt, rng.choice(("LGTM", "LBTM"))


def _mermaid(rng):
    prompt = ("You are a python code to Mermaid Sequence Diagram translator in function detail.\nTranslate the given "
              "markdown text to a Mermaid Sequence Diagram.\nReturn the merged Mermaid sequence diagram in a "
              "markdown code block format.\n\n## Markdown text\n```python\n# " + _file(rng) + " by " + _name(rng)
              + "\n" + _code(rng) + "```\n")
    a, b = rng.sample(NOUNS, 2)
    return prompt, f"```mermaid\nsequenceDiagram\n    participant {a}\n    participant {b}\n    {a}->>{b}: call\n```"


def _test(rng):
    fname = _file(rng)
    prompt = ("NOTICE\n1. Role: You are a QA engineer; the main goal is to design, develop, and execute PEP8 "
              "compliant, well-structured, maintainable test cases and scripts for Python 3.9. Your focus should "
              "be on ensuring the product quality of the entire project through systematic testing.\n2. "
              "Requirement: Based on the context, develop a comprehensive test suite that adequately covers all "
              "relevant aspects of the code file under review. Your test suite will be part of the overall "
              "project QA, so please develop complete, robust, and reusable test cases.\n3. Attention1: Use '##' "
              "to split sections, not '#', and '## <SECTION_NAME>' SHOULD WRITE BEFORE the test case or script.\n"
              "-----\n## Given the following code, please write appropriate test cases using Python's unittest "
              "framework to verify the correctness and robustness of this code:\n```python\n" + _code(rng)
              + "```\nNote that the code to test is at " + fname + ", we will put your test code at tests/test_"
              + fname + ", and run your test code from the workspace root.\n")
    return prompt, "```python\nimport unittest\n\nclass TestIt(unittest.TestCase):\n    def test_ok(self):\n" \
                   "        self.assertTrue(True)\n```"


def _debug(rng):
    fname = _file(rng)
    err = rng.choice(("NameError: name 'x' is not defined", "AssertionError: 3 != 4",
                      "TypeError: unsupported operand type(s) for +: 'int' and 'str'",
                      "ModuleNotFoundError: No module named 'requests'"))
    prompt = ("Role: You are a senior development and qa engineer, your role is summarize the code running result.\n"
              "If the running result does not include an error, you should explicitly approve the result.\nOn the "
              "other hand, if the running result indicates some error, you should point out which part, the "
              "development code or the test code, produces the error,\nand give specific instructions on fixing "
              "the errors. Here is the code info:\n\n## Development Code File Name\n" + fname + "\n## Development "
              "Code\n```python\n" + _code(rng) + "```\n## Test File Name\ntest_" + fname + "\n## Running Command\n"
              "python tests/test_" + fname + "\n## Running Output\nstandard output: Ran " + str(rng.randint(1, 30))
              + " tests in 0." + str(rng.randint(0, 999)) + "s;\nstandard errors: " + err + ";\n\nNow you should "
              "begin your analysis\n---\n## instruction:\nPlease summarize the cause of the errors and give "
              "correction instruction\n## File To Rewrite:\nDetermine the ONE file to rewrite in order to fix the "
              "error, for example, xyz.py, or test_xyz.py\n## Status:\nDetermine if all of the code works fine, if "
              "so write PASS, else FAIL,\nWRITE ONLY ONE WORD, PASS OR FAIL, IN THIS SECTION\n## Send To:\nPlease "
              "write NoOne if there are no errors, Engineer if the errors are due to problematic development codes, "
              "else QaEngineer,\nWRITE ONLY ONE WORD, NoOne OR Engineer OR QaEngineer, IN THIS SECTION.\n")
    return prompt, f"## instruction:\nFix the error {err.split(':')[0]}.\n## File To Rewrite:\n{fname}\n" \
                   f"## Status:\nFAIL\n## Send To:\nEngineer"


def _summarise_meeting(rng):
    people = [_name(rng) for _ in range(rng.randint(2, 4))]
    lines = "\n".join(f"{p}: we should ship {rng.choice(FEATURES)} before {rng.choice(('Monday', 'Friday'))}."
                      for p in people)
    prompt = ("### Requirements\n1. Please summarize the latest dialogue based on the reference information "
              "(secondary) and dialogue history (primary). Do not include text that is irrelevant to the "
              "conversation.\n- The context is for reference only. If it is irrelevant to the user's search "
              "request history, please reduce its reference and usage.\n2. If there are citable links in the "
              "context, annotate them in the main text in the format [main text](citation link).\n3. Reply in "
              "the language of the user.\n\n### Dialogue History (For example)\n" + lines + "\n\n### Current "
              "Question\nWhat did the team decide about " + rng.choice(FEATURES) + "?\n\n### Current Reply: "
              "Based on the information, please write the reply to the Question\n")
    return prompt, f"The team agreed that {people[0]} will ship it before the deadline."


TEMPLATES: dict[str, tuple[float, Any]] = {
    "write_prd": (1.0, _prd),
    "write_design": (0.8, _design),
    "write_code": (1.6, _write_code),
    "write_code_review": (1.2, _review),
    "mermaid_sequence": (0.6, _mermaid),
    "write_test": (0.9, _test),
    "debug_error": (0.7, _debug),
    "summarize_dialogue": (0.5, _summarise_meeting),
}


def _record(i: int, rng: random.Random, prompt: str, answer: str, metadata: dict[str, Any],
            prefix: str) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{i:05d}",
        "timestamp": f"2026-10-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
        "model": "gpt-4o",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "temperature": 0},
        "response": {"id": f"chatcmpl-{prefix}-{i}", "object": "chat.completion", "model": "gpt-4o",
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                     "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": max(1, len(answer) // 4),
                               "total_tokens": (len(prompt) + len(answer)) // 4}},
        "metadata": metadata,
    }


def template_log(calls: int = 480, seed: int = 0) -> list[dict[str, Any]]:
    """``calls`` records of the MetaGPT-style agent; ``metadata.template`` is each call's true task."""
    rng = random.Random(seed)
    names = list(TEMPLATES)
    weights = [TEMPLATES[n][0] for n in names]
    out = []
    for i in range(calls):
        name = rng.choices(names, weights)[0]
        prompt, answer = TEMPLATES[name][1](rng)
        out.append(_record(i, rng, prompt, answer, {"template": name}, "tpl"))
    return out


# --- ReAct-prompt agents ----------------------------------------------------------------------------------------

REACT_AGENTS = {
    "travel": {
        "tools": {"search_flights": "Search flights between two airports on a date. Input: 'FROM,TO,YYYY-MM-DD'.",
                  "book_hotel": "Book a hotel room in a city for a number of nights. Input: 'CITY,NIGHTS'.",
                  "currency_convert": "Convert an amount between currencies. Input: 'AMOUNT,FROM,TO'."},
        "questions": ("Find me a flight from {a} to {b} on {d} and a hotel for {n} nights.",
                      "How much is {n}00 EUR in USD, and is there a flight from {a} to {b} on {d}?",
                      "{p} needs a hotel in {b} for {n} nights after flying from {a}."),
    },
    "math_research": {
        "tools": {"calculator": "Useful for when you need to answer questions about math. Input: an expression.",
                  "wikipedia": "A wrapper around Wikipedia. Input: a search query.",
                  "unit_converter": "Convert a quantity between units. Input: 'VALUE,FROM_UNIT,TO_UNIT'."},
        "questions": ("What is the population of {b} divided by {n}?",
                      "Who founded {b}, and what is {n} to the power of 3?",
                      "How many kilometres is {n}0 miles, and how tall is the tallest building in {a}?"),
    },
    "sql_analyst": {
        "tools": {"sql_db_query": "Execute a SQL query against the sales database. Input: a correct SQL query.",
                  "sql_db_schema": "Get the schema and sample rows of the given tables. Input: comma-separated "
                                   "table names.",
                  "sql_db_list_tables": "List the tables in the database. Input: an empty string."},
        "questions": ("Which {n} customers in {b} spent the most last quarter?",
                      "What was the total revenue from {a} in {d}?",
                      "How many orders did {p} place since {d}?"),
    },
}
REACT_PROMPT = (
    "Answer the following questions as best you can. You have access to the following tools:\n\n{tools}\n\n"
    "Use the following format:\n\nQuestion: the input question you must answer\nThought: you should always think "
    "about what to do\nAction: the action to take, should be one of [{names}]\nAction Input: the input to the "
    "action\nObservation: the result of the action\n... (this Thought/Action/Action Input/Observation can repeat N "
    "times)\nThought: I now know the final answer\nFinal Answer: the final answer to the original input question\n\n"
    "Begin!\n\nQuestion: {question}\nThought:{scratchpad}")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Denver", "Krakow", "Hanoi", "Perth", "Quito")


def react_log(calls: int = 480, seed: int = 0) -> list[dict[str, Any]]:
    """``calls`` records of three ReAct agents; ``metadata.agent`` and ``metadata.action`` (tool or ``final``)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < calls:
        agent = rng.choice(list(REACT_AGENTS))
        spec = REACT_AGENTS[agent]
        tools = "\n".join(f"{n}: {d}" for n, d in spec["tools"].items())
        question = rng.choice(spec["questions"]).format(
            a=rng.choice(CITIES), b=rng.choice(CITIES), d=f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            n=rng.randint(2, 9), p=_name(rng))
        scratchpad = ""
        for _ in range(rng.randint(1, 3)):
            action = rng.choice(list(spec["tools"]))
            arg = f"{rng.choice(CITIES)},{rng.randint(1, 99)}"
            answer = f" I should use {action} to find this out.\nAction: {action}\nAction Input: {arg}"
            prompt = REACT_PROMPT.format(tools=tools, names=", ".join(spec["tools"]), question=question,
                                         scratchpad=scratchpad)
            out.append(_record(i, rng, prompt, answer, {"agent": agent, "action": action}, "react"))
            i += 1
            scratchpad += answer + f"\nObservation: {rng.randint(1, 9999)} results for {arg}\nThought:"
        prompt = REACT_PROMPT.format(tools=tools, names=", ".join(spec["tools"]), question=question,
                                     scratchpad=scratchpad)
        answer = f" I now know the final answer.\nFinal Answer: The answer is {rng.randint(1, 9999)}."
        out.append(_record(i, rng, prompt, answer, {"agent": agent, "action": "final"}, "react"))
        i += 1
    return out[:calls]
