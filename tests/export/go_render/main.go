// Command go_render renders an Ollama Modelfile TEMPLATE the way Ollama does, for tunesmith's tests
// (tests/export/test_ollama.py). Standard library only, offline.
//
// Input (stdin, JSON): {"template": str, "system": str, "messages": [api.Message...], "tools": [api.Tool...],
// "think": true|false|"low"|"medium"|"high"|null, "harmony": bool, "ollama_0_9": bool}
// Output (stdout, JSON): {"prompt": str, "think_tags": [open, close], "tool_tag": str, "vars": [...]}
//
// What is mirrored from github.com/ollama/ollama (read at commit fb30760996871fa9460115c753afd2c60d4ab0f7; our own
// code, written after its behaviour):
//   - server/routes.go ChatHandler: the Modelfile SYSTEM becomes a leading system message when the request's first
//     message is not a system message; a model with the thinking capability (tags inferred from the template, or
//     the gpt-oss family, which Ollama's harmony handling covers: "harmony" here) gets Think=true when the request
//     leaves it unset.
//   - template/template.go: Parse (missingkey=zero, the funcs json/currentDate/yesterdayDate), Vars (the template
//     must use .Messages, else Ollama renders it in its legacy .Prompt/.Response mode), collate (consecutive
//     messages of one role, tool messages excepted, merged with "\n\n"; .System = every system message joined with
//     "\n\n"), the data passed to Execute (System, Messages, Tools, Response, Think, ThinkLevel, IsThinkSet) and the
//     template-facing types (templateMessage, templateToolCall{ID, Function{Index, Name, Arguments}},
//     templateTool, whose maps print as JSON through String()).
//   - api/types.go: Message, ToolCall, Tool, ToolProperty, PropertyType (a string or a list of strings) and
//     ThinkValue (Bool, String: true -> "medium").
//   - thinking/template.go InferTags and tools/template.go parseTag: the thinking tags and the tool-call tag Ollama
//     reads off a template to parse a model's output, reported so tests can check them.
//
// Not mirrored: images, context truncation, filterThinkTags (strips <think>...</think> from the content of the
// qwen3 family's earlier assistant turns; the tests send reasoning in "thinking", never inline), renderers/parsers
// selected by a Modelfile's RENDERER/PARSER (the Modelfiles under test use TEMPLATE).
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// ---- api/types.go ----

type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt PropertyType) String() string {
	if len(pt) == 0 {
		return ""
	}
	if len(pt) == 1 {
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

// ToolProperty: Ollama keeps a nested object's properties in an insertion-ordered map that marshals to JSON in
// that order; json.RawMessage does the same here.
type ToolProperty struct {
	AnyOf       []ToolProperty  `json:"anyOf,omitempty"`
	Type        PropertyType    `json:"type,omitempty"`
	Items       any             `json:"items,omitempty"`
	Description string          `json:"description,omitempty"`
	Enum        []any           `json:"enum,omitempty"`
	Properties  json.RawMessage `json:"properties,omitempty"`
	Required    []string        `json:"required,omitempty"`
}

type Tool struct {
	Type     string `json:"type"`
	Items    any    `json:"items,omitempty"`
	Function struct {
		Name        string `json:"name"`
		Description string `json:"description,omitempty"`
		Parameters  struct {
			Type       string                  `json:"type"`
			Defs       any                     `json:"$defs,omitempty"`
			Items      any                     `json:"items,omitempty"`
			Required   []string                `json:"required,omitempty"`
			Properties map[string]ToolProperty `json:"properties"`
		} `json:"parameters"`
	} `json:"function"`
}

type ToolCall struct {
	ID       string `json:"id,omitempty"`
	Function struct {
		Index     int            `json:"index"`
		Name      string         `json:"name"`
		Arguments map[string]any `json:"arguments"`
	} `json:"function"`
}

type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

type ThinkValue struct{ Value any }

func (t *ThinkValue) Bool() bool {
	if t == nil || t.Value == nil {
		return false
	}
	switch v := t.Value.(type) {
	case bool:
		return v
	case string:
		return v == "high" || v == "medium" || v == "low" || v == "max"
	}
	return false
}

func (t *ThinkValue) String() string {
	if t == nil || t.Value == nil {
		return ""
	}
	switch v := t.Value.(type) {
	case string:
		return v
	case bool:
		if v {
			return "medium"
		}
	}
	return ""
}

// ---- template/template.go: the types templates see ----

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]any(t))
	return string(b)
}

type templateProperties map[string]ToolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	b, _ := json.Marshal(map[string]ToolProperty(t))
	return string(b)
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

func (t templateTool) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type templateTools []templateTool

func (t templateTools) String() string {
	b, _ := json.Marshal(t)
	return string(b)
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate": func(args ...string) string {
		return time.Now().Format("2006-01-02")
	},
	"yesterdayDate": func(args ...string) string {
		return time.Now().AddDate(0, 0, -1).Format("2006-01-02")
	},
}

func convertTools(tools []Tool) templateTools {
	if tools == nil {
		return nil
	}
	out := make(templateTools, len(tools))
	for i, t := range tools {
		p := t.Function.Parameters
		out[i] = templateTool{Type: t.Type, Items: t.Items, Function: templateToolFunction{
			Name: t.Function.Name, Description: t.Function.Description,
			Parameters: templateToolFunctionParameters{Type: p.Type, Defs: p.Defs, Items: p.Items,
				Required: p.Required, Properties: templateProperties(p.Properties)}}}
	}
	return out
}

// collate: consecutive messages of one role (tool messages excepted) merge with "\n\n"; the system messages,
// joined with "\n\n", become .System.
func collate(msgs []Message) (string, []*templateMessage) {
	var system []string
	var out []*templateMessage
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
			continue
		}
		var calls []templateToolCall
		for _, tc := range m.ToolCalls {
			calls = append(calls, templateToolCall{ID: tc.ID, Function: templateToolCallFunction{
				Index: tc.Function.Index, Name: tc.Function.Name, Arguments: templateArgs(tc.Function.Arguments)}})
		}
		out = append(out, &templateMessage{Role: m.Role, Content: m.Content, Thinking: m.Thinking,
			ToolCalls: calls, ToolName: m.ToolName, ToolCallID: m.ToolCallID})
	}
	return strings.Join(system, "\n\n"), out
}

// identifiers: the field and variable names a template uses (template.go Vars/Identifiers).
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		if n.Pipe == nil {
			fail("a {{ template }} call without a pipeline: Ollama's Vars() rejects it (\"undefined template specified\")")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func vars(t *template.Template) []string {
	set := map[string]bool{}
	for _, tt := range t.Templates() {
		if tt.Tree == nil {
			continue
		}
		for _, n := range tt.Root.Nodes {
			for _, v := range identifiers(n) {
				set[strings.ToLower(v)] = true
			}
		}
	}
	var out []string
	for v := range set {
		out = append(out, v)
	}
	sort.Strings(out)
	return out
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

type request struct {
	Template string          `json:"template"`
	System   string          `json:"system"`
	Messages []Message       `json:"messages"`
	Tools    []Tool          `json:"tools"`
	Think    json.RawMessage `json:"think"`
	Harmony  bool            `json:"harmony"`
	Ollama09 bool            `json:"ollama_0_9"` // hand the template Ollama 0.9's types (legacy.go)
}

func readThink(raw json.RawMessage) *ThinkValue {
	if len(raw) == 0 || string(raw) == "null" {
		return nil
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		fail("think: %v", err)
	}
	return &ThinkValue{Value: v}
}

func main() {
	var req request
	dec := json.NewDecoder(os.Stdin)
	if err := dec.Decode(&req); err != nil {
		fail("reading the request: %v", err)
	}
	for i := range req.Messages {
		req.Messages[i].Role = strings.ToLower(req.Messages[i].Role) // api.Message.UnmarshalJSON
	}

	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fail("template does not parse: %v", err)
	}
	v := vars(tmpl)
	if !contains(v, "messages") {
		fail("the template does not use .Messages: Ollama would render it in its legacy prompt/response mode")
	}

	open, close := inferThinkTags(tmpl)
	think := readThink(req.Think)
	if think == nil && ((open != "" && close != "") || req.Harmony) {
		think = &ThinkValue{Value: true} // routes.go: a thinking-capable model thinks unless told not to
	}

	msgs := req.Messages
	if len(msgs) > 0 && msgs[0].Role != "system" && req.System != "" {
		msgs = append([]Message{{Role: "system", Content: req.System}}, msgs...)
	}
	system, collated := collate(msgs)

	var tools templateTools
	if req.Tools != nil {
		tools = convertTools(req.Tools)
	}
	data := map[string]any{
		"System": system, "Messages": collated, "Tools": tools, "Response": "",
		"Think": think.Bool(), "ThinkLevel": think.String(), "IsThinkSet": think != nil,
	}
	if req.Ollama09 {
		data["Messages"], data["Tools"] = legacyData(collated, req.Tools)
	}
	var b bytes.Buffer
	err = tmpl.Execute(&b, data)
	if err != nil {
		fail("template does not execute: %v", err)
	}
	out, _ := json.Marshal(map[string]any{
		"prompt": b.String(), "think_tags": []string{open, close}, "tool_tag": toolTag(tmpl), "vars": v,
	})
	os.Stdout.Write(out)
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}
