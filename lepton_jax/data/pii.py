"""PII and secrets in text (the `pii` filter): found, and replaced by placeholders, byte for byte
everywhere else.

Kinds and placeholders (KINDS):
  email        <EMAIL>        name@domain.tld
  ip_address   <IP_ADDRESS>   IPv4 and IPv6 (three groups or more), checked by `ipaddress`
  phone        <PHONE>        North-American style numbers written with separators
  credit_card  <CREDIT_CARD>  13-19 digits (spaces or dashes allowed) of a card network's
                              prefix and length that pass the Luhn check
  key          <KEY>          private-key blocks; token formats (AWS, GitHub, GitLab, Slack,
                              Stripe, JWT, npm, PyPI, OpenAI, ...) by detect-secrets' detectors;
                              values assigned to names like password/secret/api_key
                              (detect-secrets' KeywordDetector) that look random: at least 8
                              characters, Shannon entropy >= 3 bits a character, none of
                              detect-secrets' heuristics (templates, ids, sequences) matching

The allow-list keeps what code is full of and leaks nothing (DEFAULT_ALLOW, plus any strings or
regexes given): e-mail addresses at the example/test/invalid/localhost domains (RFC 2606) and
example.com/.net/.org; IP addresses that are not globally routable (loopback such as 127.0.0.1,
private, link-local, multicast, the documentation ranges 192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24 and 2001:db8::/32); dotted numbers that are version or section numbers (after
`v`, `version`, `release`, `section`, `§`) or the tail of a longer dotted run (an OID). Hex
digests are never matched: no hex-entropy detector runs. The stdlib measurement (docs/data.md)
shows what is still caught.

detect-secrets is imported when the first text is scanned (the `data` extra), so `pip install .`
stays JAX-only.
"""
from collections.abc import Sequence
import bisect
import functools
import itertools
import ipaddress
import math
import re

KINDS = {'email': '<EMAIL>', 'ip_address': '<IP_ADDRESS>', 'phone': '<PHONE>',
         'credit_card': '<CREDIT_CARD>', 'key': '<KEY>'}

ALLOWED_EMAIL_DOMAINS = ('example.com', 'example.net', 'example.org', 'example', 'test',
                         'invalid', 'localhost')
DEFAULT_ALLOW = ()  # Extra strings (exact) or regexes (full match) kept, from config.

_EMAIL = re.compile(r'(?<![\w.%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])')
_IPV4 = re.compile(r'(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)')
_IPV6 = re.compile(r'(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])')
_VERSION_BEFORE = re.compile(r'(?:\bv|version|release|ver\.?|sections?|§)[\W_]{0,8}$',
                             re.IGNORECASE)
_PHONE = re.compile(r'(?<![\w.+-])(?:\+?1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}'
                    r'(?![\w-]|\.\d)')
_CARD = re.compile(r'(?<![\w.+-])\d(?:[ -]?\d){12,18}(?![\w-]|\.\d)')
_PRIVATE_KEY = re.compile(r'-----BEGIN[A-Z ]*PRIVATE KEY( BLOCK)?-----.*?'
                          r'(?:-----END[A-Z ]*PRIVATE KEY( BLOCK)?-----|\Z)', re.DOTALL)
# detect-secrets' detectors of token formats (its high-entropy ones would flag hex digests).
_TOKEN_DETECTORS = (
    'artifactory.ArtifactoryDetector', 'aws.AWSKeyDetector',
    'azure_storage_key.AzureStorageKeyDetector', 'basic_auth.BasicAuthDetector',
    'discord.DiscordBotTokenDetector', 'github_token.GitHubTokenDetector',
    'gitlab_token.GitLabTokenDetector', 'jwt.JwtTokenDetector', 'mailchimp.MailchimpDetector',
    'npm.NpmDetector', 'openai.OpenAIDetector', 'pypi_token.PypiTokenDetector',
    'sendgrid.SendGridDetector', 'slack.SlackDetector', 'square_oauth.SquareOAuthDetector',
    'stripe.StripeDetector', 'telegram_token.TelegramBotTokenDetector',
    'twilio.TwilioKeyDetector')
# (prefixes, lengths) of the card networks: Visa, Mastercard, Amex, Discover, JCB, Diners.
_CARD_NETWORKS = ((('4',), (13, 16, 19)), ((*map(str, range(51, 56)), '22', '23', '24', '25',
                                            '26', '27'), (16,)),
                  (('34', '37'), (15,)), (('6011', '65', '644', '645', '646', '647', '648',
                                           '649'), (16, 19)),
                  (('35',), (16, 19)), (('36', '300', '301', '302', '303', '304', '305'), (14,)))


def redact(text: str, allow: Sequence[str] = DEFAULT_ALLOW) -> tuple[str, dict[str, int]]:
  """`text` with every finding replaced by its kind's placeholder, and the count of each kind."""
  spans = sorted(_findings(text, _allow_matcher(tuple(allow))), key=lambda s: (s[0], -s[1]))
  counts, pieces, end = dict.fromkeys(KINDS, 0), [], 0
  for start, stop, kind in spans:
    if start < end:  # Inside a finding already replaced.
      continue
    pieces += [text[end:start], KINDS[kind]]
    counts[kind] += 1
    end = stop
  pieces.append(text[end:])
  return ''.join(pieces), counts


def _findings(text: str, allowed) -> list[tuple[int, int, str]]:
  """(start, stop, kind) of every finding, overlapping ones included."""
  spans = []
  for match in _EMAIL.finditer(text):
    domain = match.group().rpartition('@')[2].lower()
    if not (any(domain == d or domain.endswith('.' + d) for d in ALLOWED_EMAIL_DOMAINS) or
            allowed(match.group())):
      spans.append((match.start(), match.end(), 'email'))
  for pattern in (_IPV4, _IPV6):
    for match in pattern.finditer(text):
      if _is_public_ip(match.group(), text[max(0, match.start() - 20):match.start()]) and not (
          allowed(match.group())):
        spans.append((match.start(), match.end(), 'ip_address'))
  for match in _PHONE.finditer(text):
    if not allowed(match.group()):
      spans.append((match.start(), match.end(), 'phone'))
  for match in _CARD.finditer(text):
    if _is_card_number(re.sub(r'[ -]', '', match.group())) and not allowed(match.group()):
      spans.append((match.start(), match.end(), 'credit_card'))
  for match in _PRIVATE_KEY.finditer(text):
    spans.append((match.start(), match.end(), 'key'))
  for secret in _secrets(text):
    if not allowed(secret):
      spans.extend((m.start(), m.end(), 'key') for m in re.finditer(re.escape(secret), text))
  return spans


@functools.lru_cache(maxsize=8)
def _allow_matcher(allow: tuple[str, ...]):
  """A predicate: is this finding kept (an exact string or a full-match regex of `allow`)?"""
  exact, patterns = set(allow), [re.compile(a) for a in allow]
  return lambda value: value in exact or any(p.fullmatch(value) for p in patterns)


def _is_public_ip(candidate: str, before: str) -> bool:
  if '.' in candidate and (_VERSION_BEFORE.search(before) or before.endswith('.')):
    return False  # A version string, or the tail of a longer dotted run (an OID).
  if ':' in candidate and len([g for g in candidate.split(':') if g]) < 3:
    return False  # Slices (x[1::2]) and the like.
  try:
    address = ipaddress.ip_address(candidate)
  except ValueError:
    return False
  return address.is_global and not address.is_multicast


def _is_card_number(digits: str) -> bool:
  if not any(digits.startswith(prefixes) and len(digits) in lengths
             for prefixes, lengths in _CARD_NETWORKS):
    return False
  total = 0
  for position, digit in enumerate(reversed(digits)):
    value = int(digit) * (2 if position % 2 else 1)
    total += value - 9 if value > 9 else value
  return total % 10 == 0


def _secrets(text: str) -> set[str]:
  """Secret values detect-secrets finds: token formats, and random-looking keyword values."""
  token_detectors, keyword_detector, keyword_line, rejected = _detect_secrets()
  candidates = {_secret_part(match) for detector in token_detectors
                for pattern in detector.denylist for match in pattern.finditer(text)}
  lines = text.split('\n')
  starts = list(itertools.accumulate((len(line) + 1 for line in lines), initial=0))
  # Only lines holding a keyword go through the detector (its per-line scan is the slow part).
  lowered = text.lower()  # Matching lowercase text is ~15x faster than re.IGNORECASE.
  if len(lowered) != len(text):  # A few characters (İ) lowercase to two: keep those as they are.
    lowered = ''.join(c if len(c.lower()) > 1 else c.lower() for c in text)
  keyword_lines = sorted({bisect.bisect_right(starts, m.start()) - 1
                          for m in keyword_line.finditer(lowered)})
  for line in (lines[i] for i in keyword_lines if i < len(lines)):
    candidates.update(secret.secret_value or ''
                      for secret in keyword_detector.analyze_line(filename='code.py', line=line))
  return {value for value in candidates
          if len(value) >= 8 and _entropy(value) >= 3.0 and not rejected(value)}


def _secret_part(match: re.Match) -> str:
  """The secret in a detector's match: its longest group (the key in `aws_secret = "KEY"`),
  unless that only begins the match (`ghp` of a GitHub token): then the whole match."""
  groups = [i for i in range(1, (match.re.groups or 0) + 1)
            if match.group(i) and match.start(i) > match.start()]
  return match.group(max(groups, key=lambda i: len(match.group(i)))) if groups else match.group()


@functools.cache
def _detect_secrets():
  """detect-secrets' detectors, built once (imported here: an optional dependency)."""
  import importlib  # pylint: disable=g-import-not-at-top
  from detect_secrets.filters import heuristic  # pylint: disable=g-import-not-at-top
  from detect_secrets.plugins import keyword  # pylint: disable=g-import-not-at-top
  token_detectors = []
  for name in _TOKEN_DETECTORS:
    module, cls = name.split('.')
    token_detectors.append(getattr(importlib.import_module(f'detect_secrets.plugins.{module}'),
                                   cls)())
  keyword_line = re.compile('|'.join(keyword.DENYLIST))  # Lowercase, as it searches.

  def rejected(value: str) -> bool:
    return (heuristic.is_templated_secret(value) or heuristic.is_sequential_string(value) or
            heuristic.is_potential_uuid(value) or heuristic.is_prefixed_with_dollar_sign(value)
            or heuristic.is_not_alphanumeric_string(value))

  return token_detectors, keyword.KeywordDetector(), keyword_line, rejected


def _entropy(value: str) -> float:
  """Shannon entropy in bits per character."""
  counts = [value.count(c) for c in set(value)]
  return -sum(c / len(value) * math.log2(c / len(value)) for c in counts)
