"""Generate a realistic, seeded call log of a multi-task customer-support agent, in `openai` import format.

The agent works for "Acme Outfitters", an invented outdoor-gear shop. Its LLM calls fall into five recurring task
kinds plus one-off requests, which is the mix slmigrate is built to find and migrate:

- ``intent``     classify a customer message into one of six intents (short label answer)
- ``extract``    pull order fields out of a message (JSON answer, every value copied verbatim from the text)
- ``tool``       pick one support tool and fill its arguments (OpenAI ``tool_calls``; tools offered in the request)
- ``summarise``  summarise a support transcript for the ticket (free text)
- ``sql``        turn an analyst's question into one SQLite query over a fixed schema
- ``open_ended`` varied one-off requests (copy, e-mails, explanations), each one different

Support tickets run as sessions (intent -> extract -> tool -> summarise share ``metadata.session``); analysts'
SQL questions come in short sessions of their own. The narrow tasks' answers are deterministic functions of the
request, so a small model can learn them from a few hundred examples. Names, e-mails, phones and addresses are
fake (Faker, seeded): the log exercises the PII scrubber without holding anyone's data.

Usage:  python examples/agent_log.py --out calls.jsonl [--calls 600] [--seed 0]
The same seed always gives a byte-identical file. ``metadata.task`` names each call's true task kind, so cluster
quality can be measured against it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from faker import Faker

TASKS = ("intent", "extract", "tool", "summarise", "sql", "open_ended")
INTENTS = ("order_status", "return_request", "cancel_order", "change_address", "product_question", "billing_issue")

# No street words (Trail, Ridge, Run, ...) after another capitalised word: "2 Ridge Runner Trail Shoes" reads as a
# street address to curation, which then scrubs prompt and answer differently and leaves an impossible target.
PRODUCTS = (
    "Trailblazer 40L Backpack", "Summit Down Jacket", "Trailrunner Shoes", "Alpine 2-Person Tent",
    "Canyon Water Filter", "Basecamp Sleeping Bag", "Glacier Trekking Poles", "Headlamp Pro 400",
    "Coastal Rain Shell", "Timberline Wool Socks", "Nomad Camp Stove", "Riverbend Dry Bag",
    "Everest Insulated Bottle", "Pathfinder GPS Watch", "Sierra Hammock", "Boulder Climbing Harness",
)
RETURN_REASONS = {
    "damaged": ("arrived damaged", "came with a torn seam", "was broken when I opened the box"),
    "wrong_size": ("is the wrong size", "runs too small", "is too big for me"),
    "not_as_described": ("looks nothing like the photos", "is not what the listing described",
                         "has a different colour than advertised"),
}

# --- prompts (kept short: a fine-tune on a CPU pays for every token) -------------------------------------------

INTENT_SYSTEM = (
    "You are the triage step of Acme Outfitters customer support. Classify the customer's message into exactly "
    "one intent: order_status, return_request, cancel_order, change_address, product_question, billing_issue. "
    "Answer with the intent label only."
)
EXTRACT_SYSTEM = (
    "Extract these fields from the customer's message and answer with one JSON object only: customer_name, "
    "email, order_id, product, quantity (integer). Copy values exactly as written; use null for a missing field."
)
TOOL_SYSTEM = (
    "You are Acme Outfitters' support agent. Handle the customer's request by calling exactly one of the "
    "available tools with arguments taken from the message."
)
SUMMARY_SYSTEM = (
    "Summarise this Acme Outfitters support conversation for the ticket in one or two sentences: who the "
    "customer is, what they wanted, and what the agent did."
)
SQL_SYSTEM = (
    "You write SQLite queries for Acme Outfitters analysts. Schema: customers(id, name, email, city); "
    "orders(id, customer_id, status, total, created_at); order_items(order_id, product, quantity, price). "
    "Answer with one SQL query only."
)
OPEN_SYSTEMS = (
    "You are a helpful assistant for the Acme Outfitters team.",
    "You are Acme Outfitters' copywriter. Write in a warm, outdoorsy voice.",
    "You are an assistant that helps Acme Outfitters staff with everyday writing and questions.",
)


def _fn(name: str, description: str, props: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": required}}}


_ORDER = {"order_id": {"type": "string"}}
TOOLS = [
    _fn("get_order_status", "Look up where an order is.", dict(_ORDER), ["order_id"]),
    _fn("create_return", "Open a return for an order.", {**_ORDER, "reason": {
        "type": "string", "enum": sorted(RETURN_REASONS)}}, ["order_id", "reason"]),
    _fn("cancel_order", "Cancel an order that has not shipped.", dict(_ORDER), ["order_id"]),
    _fn("update_shipping_address", "Change an order's delivery address.", {**_ORDER, "address": {
        "type": "string"}}, ["order_id", "address"]),
    _fn("search_products", "Search the catalogue for a product.", {"query": {"type": "string"}}, ["query"]),
    _fn("open_billing_case", "Open a billing case for a charge problem.", {**_ORDER, "email": {
        "type": "string"}}, ["order_id", "email"]),
]


# --- the customer behind one ticket ------------------------------------------------------------------------------

class Ticket:
    """One customer's problem; every message and answer in its session is derived from these fields."""

    def __init__(self, rng: random.Random, fake: Faker):
        self.intent = rng.choice(INTENTS)
        self.name = fake.name()
        first, last = self.name.split(" ")[0], self.name.split(" ")[-1]
        self.email = f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@{fake.free_email_domain()}"
        self.phone = fake.numerify("(###) ###-####")
        self.address = fake.address().replace("\n", ", ")
        self.order_id = f"AO-{rng.randint(100000, 999999)}"
        self.product = rng.choice(PRODUCTS)
        self.quantity = rng.randint(1, 4)
        self.reason = rng.choice(sorted(RETURN_REASONS))
        self.reason_text = rng.choice(RETURN_REASONS[self.reason])
        self.amount = f"{rng.randint(20, 400)}.{rng.randint(0, 99):02d}"
        self.days = rng.randint(2, 12)
        self.rng = rng

    def message(self) -> str:
        """The customer's opening message: its wording signals the intent, and it carries the order fields."""
        r, t = self.rng, self
        greet = r.choice(("Hi,", "Hello,", "Hey there,", "Good morning,", ""))
        sign = r.choice((f"Thanks, {t.name}", f"- {t.name}", f"{t.name}"))
        contact = r.choice((f"My email is {t.email}.", f"You can reach me at {t.email}.", f"Email: {t.email}."))
        items = f"{t.quantity} x {t.product}" if r.random() < 0.5 else f"{t.quantity} {t.product}"
        body = {
            "order_status": (
                f"where is my order {t.order_id}? I ordered {items} {t.days} days ago and the tracking has not "
                f"moved.",
                f"can you tell me the status of order {t.order_id}? It was {items} and it still hasn't arrived.",
                f"my order {t.order_id} ({items}) has not shown up yet. When will it be delivered?",
            ),
            "return_request": (
                f"I want to return my order {t.order_id}. The {t.product} {t.reason_text}. I bought {items}.",
                f"the {t.product} from order {t.order_id} {t.reason_text}, so I'd like to send back {items}.",
                f"please start a return for {t.order_id}: {items}. The {t.product} {t.reason_text}.",
            ),
            "cancel_order": (
                f"please cancel my order {t.order_id} for {items}. I don't need it anymore.",
                f"I ordered {items} by mistake. Can you cancel order {t.order_id} before it ships?",
                f"cancel order {t.order_id} please ({items}), I changed my mind.",
            ),
            "change_address": (
                f"I need to change the delivery address for order {t.order_id} ({items}). "
                f"Please ship it to {t.address} instead.",
                f"I moved! Please send order {t.order_id} with {items} to my new address: {t.address}.",
                f"wrong address on order {t.order_id}. The correct shipping address is {t.address}. "
                f"It's {items}.",
            ),
            "product_question": (
                f"does the {t.product} come in other colours? I'm thinking of buying {items} again, "
                f"like in my last order {t.order_id}.",
                f"is the {t.product} waterproof? I'd like {items} for a trip. (Past order {t.order_id}.)",
                f"I have a question about the {t.product}: how much does it weigh? Considering {items}, "
                f"same as my order {t.order_id}.",
            ),
            "billing_issue": (
                f"I was charged twice for order {t.order_id} ({items}). The second charge was ${t.amount}.",
                f"there's a wrong charge of ${t.amount} on my card for order {t.order_id}. I only bought {items}.",
                f"my invoice for {t.order_id} shows ${t.amount}, which is more than {items} should cost.",
            ),
        }[t.intent]
        parts = [greet, r.choice(body), contact]
        if r.random() < 0.4:
            parts.append(f"Phone: {t.phone}.")
        text = " ".join(p for p in parts if p)
        text = text[0].upper() + text[1:]
        return f"{text}\n{sign}"

    def extraction(self) -> dict[str, Any]:
        return {"customer_name": self.name, "email": self.email, "order_id": self.order_id,
                "product": self.product, "quantity": self.quantity}

    def tool_call(self) -> tuple[str, dict[str, Any]]:
        t = self
        return {
            "order_status": ("get_order_status", {"order_id": t.order_id}),
            "return_request": ("create_return", {"order_id": t.order_id, "reason": t.reason}),
            "cancel_order": ("cancel_order", {"order_id": t.order_id}),
            "change_address": ("update_shipping_address", {"order_id": t.order_id, "address": t.address}),
            "product_question": ("search_products", {"query": t.product}),
            "billing_issue": ("open_billing_case", {"order_id": t.order_id, "email": t.email}),
        }[t.intent]

    def transcript(self, opening: str) -> tuple[str, str]:
        """A short conversation and its summary; the summary is a fixed function of the conversation's facts."""
        t = self
        action, reply = {
            "order_status": (f"checked the tracking and confirmed delivery in {t.days} days",
                             f"Your order {t.order_id} is in transit and should arrive within {t.days} days."),
            "return_request": (f"opened a return ({t.reason}) and e-mailed a prepaid label",
                               f"I've opened a return for {t.order_id}; a prepaid label is on its way to "
                               f"{t.email}."),
            "cancel_order": ("cancelled the order and confirmed a full refund",
                             f"Order {t.order_id} is cancelled and the refund will reach your card in 3-5 days."),
            "change_address": ("updated the shipping address",
                               f"Done - order {t.order_id} will now ship to {t.address}."),
            "product_question": ("answered the product question and shared the product page",
                                 f"Yes, the {t.product} comes in three colours; here is the product page."),
            "billing_issue": (f"opened a billing case for the ${t.amount} charge",
                              f"I've opened a billing case about the ${t.amount} charge; finance will reply to "
                              f"{t.email} within 2 business days."),
        }[t.intent]
        closing = self.rng.choice(("Great, thank you!", "Perfect, thanks.", "OK, appreciate it.", "Thanks!"))
        convo = f"Customer: {opening}\nAgent: {reply}\nCustomer: {closing}"
        want = {
            "order_status": "asked where order", "return_request": "asked to return order",
            "cancel_order": "asked to cancel order", "change_address": "asked to change the address of order",
            "product_question": "asked about the product in order", "billing_issue": "reported a billing problem "
            "with order",
        }[t.intent]
        summary = (f"{t.name} ({t.email}) {want} {t.order_id} ({t.quantity} x {t.product}). "
                   f"The agent {action}.")
        return convo, summary


# --- analysts' SQL questions -------------------------------------------------------------------------------------

def sql_question(rng: random.Random, fake: Faker) -> tuple[str, str]:
    city = fake.city()
    status = rng.choice(("shipped", "delivered", "cancelled", "returned", "pending"))
    year = rng.choice((2023, 2024, 2025))
    product = rng.choice(PRODUCTS)
    n = rng.choice((5, 10, 20))
    amount = rng.choice((100, 250, 500))
    email = fake.email()
    kinds: list[tuple[str, str]] = [
        (f"How many orders are {status}?", f"SELECT COUNT(*) FROM orders WHERE status = '{status}';"),
        (f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = '{city}';"),
        (f"What was the total revenue in {year}?",
         f"SELECT SUM(total) FROM orders WHERE strftime('%Y', created_at) = '{year}';"),
        (f"List the top {n} customers by total spend.",
         "SELECT c.name, SUM(o.total) AS spend FROM customers c JOIN orders o ON o.customer_id = c.id "
         f"GROUP BY c.id ORDER BY spend DESC LIMIT {n};"),
        (f"How many units of {product} have we sold?",
         f"SELECT SUM(quantity) FROM order_items WHERE product = '{product}';"),
        (f"Show all orders over ${amount} that are {status}.",
         f"SELECT * FROM orders WHERE total > {amount} AND status = '{status}';"),
        (f"Which orders did the customer with email {email} place?",
         "SELECT o.* FROM orders o JOIN customers c ON o.customer_id = c.id "
         f"WHERE c.email = '{email}';"),
        (f"What is the average order value for customers in {city}?",
         "SELECT AVG(o.total) FROM orders o JOIN customers c ON o.customer_id = c.id "
         f"WHERE c.city = '{city}';"),
        (f"List the {n} best-selling products.",
         "SELECT product, SUM(quantity) AS units FROM order_items GROUP BY product "
         f"ORDER BY units DESC LIMIT {n};"),
    ]
    question, sql = rng.choice(kinds)
    lead = rng.choice(("", "Quick one: ", "For the weekly report: ", "Can you write a query? "))
    return lead + question, sql


# --- one-off requests: each is built from independent choices, so no two are alike ------------------------------

def open_request(rng: random.Random, fake: Faker) -> tuple[str, str]:
    product = rng.choice(PRODUCTS)
    name = fake.first_name()
    place = fake.city()
    season = rng.choice(("spring", "summer", "autumn", "winter"))
    kinds: list[Callable[[], tuple[str, str]]] = [
        lambda: (f"Write a two-sentence product blurb for the {product} aimed at {season} hikers.",
                 f"Built for {season} trails, the {product} keeps up with every switchback and weather change. "
                 f"Pack it once and forget about it until the summit."),
        lambda: (f"Draft a short thank-you note to {name}, who helped at our {place} store's {season} sale.",
                 f"Dear {name},\n\nThank you for giving your time at the {place} {season} sale. Your energy "
                 f"made the day a success for customers and staff alike.\n\nWarm regards,\nThe Acme Outfitters "
                 f"team"),
        lambda: (f"Suggest three names for a {season} newsletter about {product.split()[-1].lower()}s.",
                 f"1. {season.title()} on the Trail\n2. The {product.split()[-1]} Report\n3. Out There This "
                 f"{season.title()}"),
        lambda: (f"Explain in plain words why layering matters for a {season} hike near {place}.",
                 f"Layers let you add or shed warmth as you move: a base layer moves sweat away, a mid layer "
                 f"holds heat, and a shell blocks wind and rain. Around {place} in {season} the weather can turn "
                 f"quickly, so layers keep you comfortable without carrying a heavy coat."),
        lambda: (f"Write a tweet announcing that the {product} is back in stock.",
                 f"Good news, adventurers: the {product} is back in stock! Grab yours before your next trip. "
                 f"#AcmeOutfitters"),
        lambda: (f"Give me an agenda for a 30-minute meeting with {name} about the {place} store opening.",
                 f"1. Welcome and goals (5 min)\n2. Store layout and stock for {place} (10 min)\n3. Staffing "
                 f"with {name} (10 min)\n4. Next steps and owners (5 min)"),
        lambda: (f"Rewrite this more politely: 'Your {product} return is late, send it now.'",
                 f"Just a friendly reminder that we haven't received your {product} return yet. Could you send "
                 f"it when you have a moment? Thank you!"),
        lambda: (f"What should go on a packing checklist for an overnight {season} trip to {place}?",
                 f"Tent or shelter, sleeping bag rated for {season}, stove and fuel, water filter, headlamp, "
                 f"layers and a rain shell, first-aid kit, map, and food for two days."),
        lambda: (f"Write a haiku about the {product} on a {season} morning.",
                 f"{season.title()} light on the ridge\nthe {product.split()[-1].lower()} waits by the door\n"
                 f"boots laced, breath like smoke"),
        lambda: (f"{name} asks whether we price-match other stores. Draft a short, honest reply.",
                 f"Hi {name}, thanks for asking! We don't price-match other retailers, but our gear comes with "
                 f"a 60-day return window and free repairs in the first year."),
        lambda: (f"Give me three interview questions for a seasonal sales associate at our {place} store.",
                 "1. Tell me about a trip you planned: what gear did you choose and why?\n2. How would you help "
                 "a customer who is unsure which tent to buy?\n3. Describe a time you stayed calm during a busy "
                 "shift."),
        lambda: (f"Translate into Spanish: 'Your {product} has shipped.'",
                 f"Su {product} ha sido enviado."),
        lambda: (f"Write a friendly out-of-office reply for {name} until {fake.day_of_week()}.",
                 f"Hi! Thanks for your message. I'm away until {fake.day_of_week()} with limited access to "
                 f"e-mail and will reply when I'm back. - {name}"),
    ]
    return rng.choice(kinds)()


# --- the openai-format record ------------------------------------------------------------------------------------

def _tokens(text: str) -> int:
    # Roughly four characters per token for English: good enough for cost figures in a synthetic log.
    return max(1, math.ceil(len(text) / 4))


class Log:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.fake = Faker("en_US")
        self.fake.seed_instance(seed)
        self.clock = datetime(2025, 3, 3, 8, 0, 0, tzinfo=timezone.utc)
        self.records: list[dict[str, Any]] = []
        self.open_seen: set[str] = set()

    def _hex(self, n: int) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def call(self, task: str, session: str, step: int, messages: list[dict[str, Any]], answer: Any,
             model: str = "gpt-4o", tools: list[dict[str, Any]] | None = None, temperature: float = 0.0,
             **extra_meta: Any) -> None:
        request: dict[str, Any] = {"model": model, "messages": messages}
        if tools:
            request["tools"] = tools
        request["temperature"] = temperature
        if isinstance(answer, tuple):  # a tool call: (name, arguments)
            name, args = answer
            arguments = json.dumps(args, ensure_ascii=False)
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{self._hex(24)}", "type": "function",
                "function": {"name": name, "arguments": arguments}}]}
            finish, completion = "tool_calls", _tokens(name + arguments)
        else:
            message = {"role": "assistant", "content": answer}
            finish, completion = "stop", _tokens(answer)
        prompt = _tokens("".join(m["content"] for m in messages) + (json.dumps(tools) if tools else ""))
        prompt += 4 * len(messages)  # per-message framing tokens
        latency = int(250 + 18 * completion + prompt * 0.4 + self.rng.random() * 300)
        self.clock += timedelta(seconds=self.rng.randint(2, 90), milliseconds=self.rng.randint(0, 999))
        created = int(self.clock.timestamp())
        self.records.append({
            "id": f"acme-{self._hex(16)}",
            "timestamp": self.clock.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "latency_ms": latency,
            "model": model,
            "request": request,
            "response": {
                "id": f"chatcmpl-{self._hex(24)}", "object": "chat.completion", "created": created,
                "model": f"{model}-2024-08-06" if model == "gpt-4o" else f"{model}-2024-07-18",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion},
            },
            "metadata": {"task": task, "session": session, "step": step, "agent": "acme-support",
                         **extra_meta},
        })

    def support_session(self, full: bool = False) -> None:
        t = Ticket(self.rng, self.fake)
        session = f"ticket-{self._hex(10)}"
        msg = t.message()
        user = {"role": "user", "content": msg}
        # The triage step runs on the cheaper model, the rest on gpt-4o: a common cost split in real agents.
        self.call("intent", session, 0, [{"role": "system", "content": INTENT_SYSTEM}, user], t.intent,
                  model="gpt-4o-mini", workflow="support")
        steps = [("extract", 0.8), ("tool", 0.9), ("summarise", 0.7)]
        step = 1
        for task, p in steps:
            if self.rng.random() >= p and not full:
                continue
            if task == "extract":
                self.call("extract", session, step, [{"role": "system", "content": EXTRACT_SYSTEM}, user],
                          json.dumps(t.extraction(), ensure_ascii=False), workflow="support")
            elif task == "tool":
                self.call("tool", session, step, [{"role": "system", "content": TOOL_SYSTEM}, user],
                          t.tool_call(), tools=TOOLS, workflow="support")
            else:
                convo, summary = t.transcript(msg.replace("\n", " "))
                self.call("summarise", session, step, [{"role": "system", "content": SUMMARY_SYSTEM},
                                                        {"role": "user", "content": convo}], summary,
                          temperature=0.3, workflow="support")
            step += 1

    def sql_session(self) -> None:
        session = f"analytics-{self._hex(10)}"
        for step in range(self.rng.randint(1, 3)):
            question, sql = sql_question(self.rng, self.fake)
            self.call("sql", session, step, [{"role": "system", "content": SQL_SYSTEM},
                                             {"role": "user", "content": question}], sql, workflow="analytics")

    def open_call(self) -> None:
        # One-off means one-off: draw again on the rare repeat of an earlier request.
        request, answer = open_request(self.rng, self.fake)
        while request in self.open_seen:
            request, answer = open_request(self.rng, self.fake)
        self.open_seen.add(request)
        self.call("open_ended", f"adhoc-{self._hex(10)}", 0,
                  [{"role": "system", "content": self.rng.choice(OPEN_SYSTEMS)},
                   {"role": "user", "content": request}], answer, temperature=0.7, workflow="adhoc")


def iter_records(calls: int = 600, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``calls`` records of the Acme Outfitters agent, deterministic in ``seed``, one session at a time (a
    million-call log never has to be held in memory)."""
    if calls < 1:
        raise ValueError("calls must be at least 1")
    log = Log(seed)
    left = calls

    def drain() -> Iterator[dict[str, Any]]:
        nonlocal left
        batch, log.records = log.records[:left], []
        left -= len(batch)
        yield from batch

    # Open with one session of each kind (a complete ticket first) so that any log of 8 or more calls holds every
    # task kind.
    log.support_session(full=True)
    log.sql_session()
    log.open_call()
    yield from drain()
    while left > 0:
        roll = log.rng.random()
        if roll < 0.70:
            log.support_session()
        elif roll < 0.85:
            log.sql_session()
        else:
            log.open_call()
        yield from drain()


def generate(calls: int = 600, seed: int = 0) -> list[dict[str, Any]]:
    """``calls`` records of the Acme Outfitters agent, deterministic in ``seed``."""
    return list(iter_records(calls, seed))


def write(path: str | Path, calls: int = 600, seed: int = 0) -> int:
    records = generate(calls, seed)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a seeded, realistic multi-task agent call log (openai format, one JSON per line).",
        epilog="Example: python examples/agent_log.py --out calls.jsonl --calls 600 --seed 0")
    parser.add_argument("--out", required=True, help="Output .jsonl file.")
    parser.add_argument("--calls", type=int, default=600, help="Number of calls (default 600).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed (default 0).")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    n = write(args.out, args.calls, args.seed)
    print(f"wrote {n} calls to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
