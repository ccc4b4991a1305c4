// Chat templates against two independent references: the fixture rendered by real Jinja2 3.1 (as
// transformers configures it), and hand-derived Jinja2 outputs for snippets that exercise the
// whitespace rules, expressions, filters and tests one at a time.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "support/fixtures.h"
#include "tokenizer/chat_template.h"

namespace shardlm {
namespace {

nlohmann::json load_fixture() {
  const std::string path = test::fixture_path("tokenizers/chat_templates.json");
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  return nlohmann::json::parse(in);
}

std::string render_json(const std::string& tmpl, const std::string& context_json) {
  return ChatTemplate(tmpl).render(nlohmann::json::parse(context_json));
}

// The error message of rendering (or parsing) `tmpl`, or "<no error>".
std::string error_of(const std::string& tmpl, const std::string& context_json = "{}") {
  try {
    render_json(tmpl, context_json);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

TEST(ChatTemplate, FixtureMatchesJinja2ByteForByte) {
  const nlohmann::json fx = load_fixture();
  int rendered = 0, errors = 0;
  for (const auto& c : fx.at("cases")) {
    const std::string name = c.at("template").get<std::string>();
    const ChatTemplate tmpl(fx.at("templates").at(name).get<std::string>());
    const auto& conv = fx.at("conversations").at(c.at("conversation").get<size_t>());
    std::vector<ChatMessage> messages;
    for (const auto& m : conv) messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
    const bool agp = c.at("add_generation_prompt").get<bool>();
    const std::string bos = c.at("bos_token").get<std::string>(), eos = c.at("eos_token").get<std::string>();
    nlohmann::json ctx = {{"messages", conv}, {"add_generation_prompt", agp}, {"bos_token", bos}, {"eos_token", eos}};
    SCOPED_TRACE(name + " conversation " + std::to_string(c.at("conversation").get<int>()) + (agp ? " +gen" : ""));
    if (c.contains("rendered")) {
      const std::string want = c.at("rendered").get<std::string>();
      EXPECT_EQ(tmpl.render(messages, agp, bos, eos), want);
      EXPECT_EQ(tmpl.render(ctx), want);
      ++rendered;
    } else {
      const std::string want = c.at("error").get<std::string>();
      try {
        tmpl.render(messages, agp, bos, eos);
        ADD_FAILURE() << "expected raise_exception: " << want;
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()), want);
      }
      try {
        tmpl.render(ctx);
        ADD_FAILURE() << "expected raise_exception: " << want;
      } catch (const Error& e) {
        EXPECT_EQ(std::string(e.what()), want);
      }
      ++errors;
    }
  }
  EXPECT_EQ(rendered, 16);
  EXPECT_EQ(errors, 2);
}

struct Case {
  const char* tmpl;
  const char* context;
  const char* want;
};

// Outputs derived by hand from Jinja2's rules (trim_blocks removes the first newline after a block or
// comment tag; lstrip_blocks removes spaces and tabs from the line start up to one; `-` strips all
// whitespace on its side; one trailing template newline is dropped).
const Case kWhitespace[] = {
    {"{% if true %}\nyes\n{% endif %}\nend", "{}", "yes\nend"},
    {"a\n    {% if true %}\n    b\n    {% endif %}\nc", "{}", "a\n    b\nc"},
    {"a\n  {%+ if true %}x{% endif %}", "{}", "a\n  x"},
    {"{% if true +%}\nx{% endif %}", "{}", "\nx"},
    {"a  \n  {{- 'b' -}}  \n  c", "{}", "abc"},
    {"  {{ 'x' }}\n", "{}", "  x"},
    {"a\n  {# note #}\nb", "{}", "a\nb"},
    {"x\n\n", "{}", "x\n"},
    {"x\r\ny", "{}", "x\ny"},
    {"ab  {% if true %}c{% endif %}", "{}", "ab  c"},
    {"{% raw %}{{ x }}{% endraw %}", "{}", "{{ x }}"},
    {"{% set x %}\n  inner {{ 1 }}\n{% endset %}[{{ x }}]", "{}", "[  inner 1\n]"},
    {"{% for m in messages %}\n    {% if m.role == 'user' %}\n        U:{{ m.content }}\n    {% else %}\n"
     "        A:{{ m.content }}\n    {% endif %}\n{% endfor %}\n",
     R"({"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]})",
     "        U:hi\n        A:yo\n"},
};

const Case kControl[] = {
    {"{% for x in ['a','b','c'] %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
     "{{ loop.length }}{{ loop.revindex }}|{% endfor %}",
     "{}", "10TrueFalse33|21FalseFalse32|32FalseTrue31|"},
    {"{% for x in [1,2,3,4] if x is even %}{{ x }}{{ loop.length }},{% else %}none{% endfor %}"
     "{% for x in [] %}a{% else %}empty{% endfor %}",
     "{}", "22,42,empty"},
    {"{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x > 4 %}{% break %}{% endif %}"
     "{{ x }}{% endfor %}",
     "{}", "0134"},
    {"{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'system' %}"
     "{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }}",
     R"({"messages":[{"role":"user"},{"role":"system"}]})", "True"},
    // A set inside a loop body is local to that iteration; the outer value is untouched.
    {"{% set x = 1 %}{% for i in [1,2] %}{% set x = x + 10 %}{{ x }}{% endfor %}{{ x }}", "{}", "11111"},
    {"{% for i in [1,2] %}{{ y }}{% set y = i %}{{ y }}|{% endfor %}", "{}", "1|2|"},
    {"{% for x in 'abc' %}{{ loop.cycle('o','e') }}{{ loop.previtem }}{{ loop.nextitem }},{% endfor %}", "{}",
     "ob,eac,ob,"},
    {"{%- for m in messages -%}\n{{- m.role | upper -}}: {{ m.content | trim }}\n{% endfor -%}\nEND",
     R"({"messages":[{"role":"user","content":" a "},{"role":"assistant","content":"b"}]})", "USER: a\nASSISTANT: b\nEND"},
    {"{% if a %}A{% elif b %}B{% else %}C{% endif %}", R"({"b": 1})", "B"},
    {"{% macro greet(name, greeting='Hi') %}{{ greeting }} {{ name }}!{% endmacro %}"
     "{{ greet('Bob') }} {{ greet('Al', greeting='Yo') }}",
     "{}", "Hi Bob! Yo Al!"},
    {"{% for k, v in {'b': 1, 'a': 2}.items() %}{{ k }}={{ v }};{% endfor %}", "{}", "b=1;a=2;"},
    {"[{{ nothing }}]{% if nothing %}x{% endif %}{{ nothing|length }}{% for q in nothing %}q{% endfor %}", "{}",
     "[]0"},
};

const Case kExpressions[] = {
    {"{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 1 + 2 * 3 }} {{ 'a' ~ 1 ~ none }}", "{}",
     "3 -4 2 3.5 1024 7 a1None"},
    {"{{ [1, 'a', none, true, 1.5] }} {{ {'k': 'v'} }} {{ (1,) }} {{ 1e16 }} {{ 0.1 + 0.2 }} {{ False }}", "{}",
     "[1, 'a', None, True, 1.5] {'k': 'v'} (1,) 1e+16 0.30000000000000004 False"},
    {"{{ 'hello'[::-1] }} {{ [1,2,3][1:] }} {{ 'h\xc3\xa9llo'[1:3] }} {{ [1,2,3,4,5][::2] }} {{ 'abc'[-1] }}", "{}",
     "olleh [2, 3] \xc3\xa9l [1, 3, 5] c"},
    {"{{ 'b' in 'abc' }}{{ 2 in [1,2] }}{{ 'k' in {'k':1} }}{{ 3 not in [1] }}{{ 1 == 1.0 }}{{ 1 < 2 < 3 }}", "{}",
     "TrueTrueTrueTrueTrueTrue"},
    {"{{ 'y' if 1 > 2 else 'n' }}{{ 'z' if false }}.{{ not true or 'x' and 'w' }}", "{}", "n.w"},
    {"{{ 'it\\'s\\t\\u00e9\\n' }}|{{ \"a\" 'b' }}", "{}", "it's\t\xc3\xa9\n|ab"},
    {"{{ m['role'] }}{{ m.content }}{{ m.missing }}{{ l[1] }}{{ l.0 }}", R"({"m":{"role":"r","content":"c"},"l":[5,6]})",
     "rc65"},
};

const Case kFilters[] = {
    {"{{ '  x  '|trim }}|{{ 'ab'|upper }}|{{ 'hELLO wORLD'|capitalize }}|{{ 'hello world-foo'|title }}|"
     "{{ undefined_var|default('d') }}|{{ ['a','b']|join(', ') }}|{{ 'aXbX'|replace('X','-') }}|"
     "{{ [3,1]|first }}{{ [3,1]|last }}|{{ 'h\xc3\xa9llo'|length }}|{{ '42'|int + 1 }}|{{ 3|string ~ 'x' }}",
     "{}", "x|AB|Hello world|Hello World-Foo|d|a, b|a-b-|31|5|43|3x"},
    {"{{ {'a': [1, 2.5, none, true], 'b': '\xc3\xa9\"\\n'}|tojson }}", "{}",
     "{\"a\": [1, 2.5, null, true], \"b\": \"\xc3\xa9\\\"\\n\"}"},
    {"{{ {'a': 1, 'b': [1]}|tojson(indent=2) }}", "{}", "{\n  \"a\": 1,\n  \"b\": [\n    1\n  ]\n}"},
    // transformers' tojson takes ensure_ascii first, then indent, separators, sort_keys.
    {"{{ {'n': '\xc3\xa9<'}|tojson(true) }}|{{ [1,{'a':2}]|tojson(separators=(',',':')) }}|"
     "{{ {'b':1,'a':2}|tojson(sort_keys=true) }}",
     "{}", "{\"n\": \"\\u00e9<\"}|[1,{\"a\":2}]|{\"a\": 2, \"b\": 1}"},
    {"{{ 1.0 }} {{ 100.0 / 3 }} {{ 1e-5 }} {{ 123456789012345678.0 }} {{ -0.0 }} {{ 2.5e-3 }}", "{}",
     "1.0 33.333333333333336 1e-05 1.2345678901234568e+17 -0.0 0.0025"},
    {"{{ messages|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(',') }}|"
     "{{ messages|rejectattr('role', 'equalto', 'user')|list|length }}|{{ messages|selectattr('tool')|list|length }}",
     R"({"messages":[{"role":"user","content":"a"},{"role":"bot","content":"b","tool":1},{"role":"user","content":"c"}]})",
     "a,c|1|1"},
    {"{{ {'x': 1}|items|list }}|{{ 'ab'|list }}|{{ ''|default('e', true) }}|{{ 'x'|lower }}", "{}",
     "[('x', 1)]|['a', 'b']|e|x"},
};

const Case kTestsAndMethods[] = {
    {"{{ x is defined }}{{ y is undefined }}{{ none is none }}{{ 'a' is string }}{{ {} is mapping }}"
     "{{ [1] is sequence }}{{ 1.5 is number }}{{ true is true }}{{ 0 is false }}{{ x is not none }}",
     R"({"x":1})", "TrueTrueTrueTrueTrueTrueTrueTrueFalseTrue"},
    {"{{ '  a b  '.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'abc'.startswith('ab') }}|{{ 'a,b,,c'.split(',') }}|"
     "{{ ' a  b '.split() }}|{{ 'hello world'.title() }}|{{ 'abc'.endswith(('x','c')) }}|{{ 'Ab'.upper() }}"
     "{{ 'Ab'.lower() }}|{{ 'a-b'.replace('-', '+') }}|{{ 'ab  '.rstrip() }}.",
     "{}", "a b|axx|True|['a', 'b', '', 'c']|['a', 'b']|Hello World|True|ABab|a+b|ab."},
    {"{% set d = {'b': 1, 'a': 2} %}{{ d.get('a') }}{{ d.get('z', 'no') }}{{ d.get('z') }}{{ d.keys()|list }}"
     "{{ d.values()|list }}",
     "{}", "2noNone['b', 'a'][1, 2]"},
};

void run_cases(const Case* begin, const Case* end) {
  for (const Case* c = begin; c != end; ++c) {
    SCOPED_TRACE(c->tmpl);
    try {
      EXPECT_EQ(render_json(c->tmpl, c->context), c->want);
    } catch (const Error& e) {
      ADD_FAILURE() << "threw: " << e.what();
    }
  }
}

TEST(ChatTemplate, WhitespaceControl) { run_cases(std::begin(kWhitespace), std::end(kWhitespace)); }
TEST(ChatTemplate, ControlFlowAndScoping) { run_cases(std::begin(kControl), std::end(kControl)); }
TEST(ChatTemplate, Expressions) { run_cases(std::begin(kExpressions), std::end(kExpressions)); }
TEST(ChatTemplate, Filters) { run_cases(std::begin(kFilters), std::end(kFilters)); }
TEST(ChatTemplate, TestsAndMethods) { run_cases(std::begin(kTestsAndMethods), std::end(kTestsAndMethods)); }

TEST(ChatTemplate, OrderedJsonContextKeepsKeyOrderForTojson) {
  const ChatTemplate t("{{ tool|tojson }}");
  EXPECT_EQ(t.render(nlohmann::ordered_json::parse(R"({"tool": {"name": "f", "description": "d"}})")),
            "{\"name\": \"f\", \"description\": \"d\"}");
  // nlohmann::json itself sorts keys, so the plain overload sees them sorted.
  EXPECT_EQ(t.render(nlohmann::json::parse(R"({"tool": {"name": "f", "description": "d"}})")),
            "{\"description\": \"d\", \"name\": \"f\"}");
}

TEST(ChatTemplate, RaiseExceptionMessageIsVerbatim) {
  EXPECT_EQ(error_of("a{% if x %}{{ raise_exception('Bad role: ' ~ x) }}{% endif %}", R"({"x":"tool"})"),
            "Bad role: tool");
}

TEST(ChatTemplate, SyntaxErrorsNameLineAndColumn) {
  EXPECT_EQ(error_of("{{ 1 + }}"), "chat template syntax error at line 1, column 8: unexpected '}}' in expression");
  EXPECT_EQ(error_of("ab\n{% if x %}\nabc"),
            "chat template syntax error at line 3, column 4: unexpected end of template, expected '{% endif %}' "
            "to close '{% if %}' opened at line 2");
  EXPECT_EQ(error_of("x\n  {% endfor %}"), "chat template syntax error at line 2, column 6: unexpected 'endfor' with no open block");
  EXPECT_EQ(error_of("{{ 'abc }}"), "chat template syntax error at line 1, column 4: unterminated string literal");
  EXPECT_EQ(error_of("a {# x"), "chat template syntax error at line 1, column 3: missing end of comment tag '#}'");
  EXPECT_EQ(error_of("{% frobnicate %}"), "chat template syntax error at line 1, column 4: unknown tag 'frobnicate'");
  EXPECT_EQ(error_of("{% break %}"), "chat template syntax error at line 1, column 4: 'break' outside of a loop");
  EXPECT_EQ(error_of("{{ x | }}"), "chat template syntax error at line 1, column 8: expected a filter name, got '}}'");
  EXPECT_EQ(error_of("{{ a ] }}"), "chat template syntax error at line 1, column 6: unexpected ']'");
  EXPECT_EQ(error_of("{% for x in y %}{% if x %}{% endfor %}"),
            "chat template syntax error at line 1, column 30: unexpected 'endfor' inside 'if' opened at line 1");
  EXPECT_EQ(error_of("{{ x"), "chat template syntax error at line 1, column 1: unexpected end of template, expected '}}'");
}

TEST(ChatTemplate, RuntimeErrorsThrow) {
  EXPECT_EQ(error_of("{{ 'a' + 1 }}"), "chat template error at line 1: can only concatenate str (not \"int\") to str");
  EXPECT_EQ(error_of("\n{{ x.y }}"), "chat template error at line 2: 'x' is undefined");
  EXPECT_EQ(error_of("{{ 1 // 0 }}"), "chat template error at line 1: integer division or modulo by zero");
  EXPECT_EQ(error_of("{{ x|nosuchfilter }}"), "chat template error at line 1: no filter named 'nosuchfilter'");
  EXPECT_EQ(error_of("{% set x = 1 %}{% set x.a = 2 %}"),
            "chat template error at line 1: cannot assign attribute on non-namespace object 'x'");
}

TEST(ChatTemplate, HostileTemplatesHitLimitsInsteadOfHanging) {
  // Each of these would run away without a bound; each must end in a clean Error.
  const char* hostile[] = {
      "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
      "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
      "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
      "{{ range(1000000)|length }}",
      "{{ 'x' * 100000000000 }}",
  };
  for (const char* t : hostile) {
    SCOPED_TRACE(t);
    EXPECT_NE(error_of(t), "<no error>");
  }
  std::string deep = "{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}";
  EXPECT_NE(error_of(deep).find("nested too deeply"), std::string::npos);
  std::string deep_blocks;
  for (int k = 0; k < 3000; ++k) deep_blocks += "{% if true %}";
  EXPECT_NE(error_of(deep_blocks).find("nested too deeply"), std::string::npos);
}

TEST(ChatTemplate, MalformedInputNeverCrashes) {
  // Every prefix of a real template is either valid or a clean Error.
  const nlohmann::json fx = load_fixture();
  const std::string src = fx.at("templates").at("mistral").get<std::string>();
  const std::string ctx = R"({"messages":[{"role":"user","content":"hi"}],"bos_token":"<s>","eos_token":"</s>"})";
  int failures = 0;
  for (size_t n = 0; n <= src.size(); ++n) {
    try {
      render_json(src.substr(0, n), ctx);
    } catch (const Error&) {
      ++failures;
    }
  }
  EXPECT_GT(failures, 0);
}

}  // namespace
}  // namespace shardlm
